//! A throwaway PostgreSQL server for the ledger tests: Debian's `postgresql` binaries (installed
//! by scripts/test.sh), a cluster in a temporary folder on a free local port, trust
//! authentication, stopped and removed on drop. Run as root, the cluster belongs to the
//! `postgres` user (PostgreSQL refuses to run as root).
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgServer {
    pub dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
    /// Extra server settings (`-c` options), e.g. TLS.
    options: String,
}

/// The newest installed server's binaries.
fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Servers of earlier test runs that were killed before their drop ran (pg_ctl starts the
/// server in a session of its own, so it outlives the test process): stopped and removed.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("hearth-pg-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let pidfile = e.path().join("data/postmaster.pid");
        if let Some(server) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            let _ = Command::new("kill").args(["-9", &server]).status();
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgServer {
    /// A running server, or None (after saying why) when PostgreSQL is not installed; with
    /// `HEARTH_REQUIRE_POSTGRES` set (scripts/test.sh installed it), a missing one fails instead.
    pub fn start(tag: &str) -> Option<Self> {
        Self::start_with(tag, |_| String::new())
    }

    /// As `start`, with server options written by `options` (given the data folder, already
    /// made and owned by the server's user).
    pub fn start_with(tag: &str, options: impl FnOnce(&Path) -> String) -> Option<Self> {
        let Some(bin) = find_bin() else {
            assert!(
                std::env::var_os("HEARTH_REQUIRE_POSTGRES").is_none(),
                "PostgreSQL is required (HEARTH_REQUIRE_POSTGRES) but /usr/lib/postgresql/*/bin/initdb is missing"
            );
            eprintln!(
                "SKIPPED: PostgreSQL is not installed (apt-get install postgresql; scripts/test.sh does)"
            );
            return None;
        };
        sweep_stale();
        let dir = std::env::temp_dir().join(format!("hearth-pg-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Self {
            dir,
            bin,
            as_postgres: is_root(),
            port: free_port(),
            options: String::new(),
        };
        let data = s.data();
        s.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "hearth",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                // A database whose default collation is not byte order (as production ones are
                // not): the ledger's groups must sort alike in both stores all the same.
                "--locale-provider=icu",
                "--icu-locale=en-US",
                "--locale=C",
            ],
        );
        s.options = options(&data);
        s.own();
        s.resume();
        Some(s)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The cluster's files belong to the user the server runs as.
    pub fn own(&self) {
        if self.as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the cluster to postgres");
        }
    }

    /// One of the server's tools, run as the cluster's user.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        self.own();
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}\nserver log: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// Start (again) on the same port and data.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off {}",
            self.port,
            self.dir.display(),
            self.options
        );
        let data = self.data();
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
    }

    pub fn stop(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// The database every test uses (trust authentication: no password).
    pub fn url(&self) -> String {
        format!("postgres://hearth@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
