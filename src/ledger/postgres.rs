//! The usage ledger in PostgreSQL (`ledger_url = "postgres://..."`), so that every replica of a
//! deployment writes one ledger and any replica's `/v1/usage` sees them all. The same table and
//! the same queries as the SQLite file, in PostgreSQL's types.
//!
//! TLS: `sslmode=require` in the URL connects over rustls, verifying the server against
//! `ledger_ca_file` (PEM) or else the web PKI roots; `disable` and `prefer` (the default) connect
//! in the clear. A password absent from the URL is taken from `PGPASSWORD`.
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postgres::config::{Host, SslMode};
use postgres::types::ToSql;
use postgres::{Client, NoTls};

use super::query::{Dialect, UsageQuery, UsageRow};
use super::{Row, Store, Value, WriteError};
use crate::error::{HearthError, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts_ms BIGINT NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    \"user\" TEXT,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    prefill_device_ms DOUBLE PRECISION NOT NULL,
    decode_device_ms DOUBLE PRECISION NOT NULL,
    queue_ms DOUBLE PRECISION NOT NULL,
    ttft_ms DOUBLE PRECISION,
    e2e_ms DOUBLE PRECISION NOT NULL,
    finish_reason TEXT NOT NULL,
    status BIGINT NOT NULL,
    cache TEXT NOT NULL DEFAULT '',
    saved_device_ms DOUBLE PRECISION NOT NULL DEFAULT 0,
    mean_logprob DOUBLE PRECISION,
    p10_logprob DOUBLE PRECISION,
    min_logprob DOUBLE PRECISION,
    mean_entropy DOUBLE PRECISION,
    mean_margin DOUBLE PRECISION,
    repetition DOUBLE PRECISION,
    length_stop BOOLEAN
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
CREATE INDEX IF NOT EXISTS requests_tenant_ts ON requests (tenant, ts_ms);
";

/// Replicas starting together take this advisory lock around the schema: PostgreSQL's `IF NOT
/// EXISTS` does not stop two concurrent creations from colliding.
const SCHEMA_LOCK: i64 = 0x6865_6172_7468_4c47; // "hearthLG"

/// Where the ledger is and how to reach it.
#[derive(Clone)]
pub struct PgTarget {
    config: postgres::Config,
    tls: Option<rustls::ClientConfig>,
}

impl PgTarget {
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self> {
        let bad = |why: String| HearthError::Config(format!("the ledger's PostgreSQL URL: {why}"));
        let (url, root_cert) = libpq_spellings(url);
        let ca_file = ca_file.or(root_cert.as_deref());
        let mut config: postgres::Config = url.parse().map_err(|e| bad(chain(&e)))?;
        if config.get_hosts().is_empty() {
            return Err(bad("no host".into()));
        }
        if config.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                config.password(p);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("hearth");
        }
        config.keepalives(true);
        if config.get_keepalives_idle() > Duration::from_secs(60) {
            config.keepalives_idle(Duration::from_secs(60));
        }
        // A connection whose packets vanish fails in 30 s rather than in TCP's ~15 minutes,
        // which would hold the writer, and every flush waiting on it.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        let tls =
            match config.get_ssl_mode() {
                SslMode::Require => Some(client_tls(ca_file)?),
                _ if ca_file.is_some() => return Err(bad(
                    "a CA file (ledger_ca_file or sslrootcert) is given but the URL does not ask for TLS (add sslmode=require)"
                        .into(),
                )),
                _ => None,
            };
        Ok(Self { config, tls })
    }

    pub(super) fn connect(&self) -> std::result::Result<Client, postgres::Error> {
        match &self.tls {
            Some(tls) => self
                .config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone())),
            None => self.config.connect(NoTls),
        }
    }

    /// Open a writer's connection, the table made if missing (only then: a role that may only
    /// insert and select writes to a table made for it).
    pub(super) fn open_for_writing(&self) -> std::result::Result<Client, postgres::Error> {
        let mut client = self.connect()?;
        let exists: bool = client
            .query_one("SELECT to_regclass('requests') IS NOT NULL", &[])?
            .get(0);
        if !exists {
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
            tx.batch_execute(SCHEMA)?;
            tx.commit()?;
        }
        Ok(client)
    }

    /// Usage totals, on the reader connection kept in `slot` (made, or made again once, when
    /// missing or broken).
    pub(super) fn query(
        &self,
        slot: &Mutex<Option<Client>>,
        q: &UsageQuery,
    ) -> Result<Vec<UsageRow>> {
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let mut last = None;
        for _ in 0..2 {
            let mut client = match slot.take() {
                Some(c) if !c.is_closed() => c,
                _ => match self.connect() {
                    Ok(c) => c,
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                },
            };
            match run(&mut client, q) {
                Ok(rows) => {
                    *slot = Some(client);
                    return Ok(rows);
                }
                // A lost connection (closed, or the server going away: SQLSTATE 08, 57) is
                // retried on a new one; an error of the query itself would only fail again.
                Err(e)
                    if client.is_closed()
                        || e.code().is_none_or(|c| {
                            c.code().starts_with("08") || c.code().starts_with("57")
                        }) =>
                {
                    last = Some(e)
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        let why = last.map_or_else(String::new, |e| chain(&e));
        Err(HearthError::LedgerUnavailable(format!("{self}: {why}")))
    }
}

/// An error and its causes (the client's own message is only the kind: "invalid connection
/// string", "error connecting to server").
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !s.ends_with(&more) {
            s = format!("{s}: {more}");
        }
        cause = c.source();
    }
    s
}

/// libpq's spellings the client does not take: `sslmode=verify-full` and `verify-ca` become
/// `require` (which here always verifies the certificate and the host name), and
/// `sslrootcert=FILE` is taken out as the CA file (`ledger_ca_file` wins over it).
fn libpq_spellings(url: &str) -> (String, Option<std::path::PathBuf>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut root_cert = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sslmode", "verify-full" | "verify-ca")) => kept.push("sslmode=require"),
            Some(("sslrootcert", file)) => root_cert = Some(file.into()),
            _ => kept.push(pair),
        }
    }
    if kept.is_empty() {
        (base.to_string(), root_cert)
    } else {
        (format!("{base}?{}", kept.join("&")), root_cert)
    }
}

/// The URL without its password, for logs and errors.
impl std::fmt::Display for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        write!(f, "postgres://")?;
        if let Some(u) = c.get_user() {
            write!(f, "{u}@")?;
        }
        for (i, h) in c.get_hosts().iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            match h {
                Host::Tcp(h) => write!(f, "{sep}{h}")?,
                Host::Unix(p) => write!(f, "{sep}{}", p.display())?,
            }
            if let Some(p) = c.get_ports().get(i) {
                write!(f, ":{p}")?;
            }
        }
        write!(f, "/{}", c.get_dbname().unwrap_or(""))?;
        if self.tls.is_some() {
            write!(f, " (TLS)")?;
        }
        Ok(())
    }
}

fn client_tls(ca_file: Option<&Path>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |e: &dyn std::fmt::Display| HearthError::Config(format!("ledger TLS: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| bad(&format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(bad(&format!("{}: no certificate", path.display())));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(&e))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn sql_value(v: Value) -> Box<dyn ToSql + Sync> {
    match v {
        Value::Int(i) => Box::new(i),
        Value::Real(f) => Box::new(f),
        Value::Text(t) => Box::new(t),
        Value::Bool(b) => Box::new(b),
    }
}

fn run(client: &mut Client, q: &UsageQuery) -> std::result::Result<Vec<UsageRow>, postgres::Error> {
    let select = q.select(Dialect::Postgres);
    let mut args: Vec<&(dyn ToSql + Sync)> = vec![&select.start_ms, &select.end_ms];
    if let Some(t) = &select.tenant {
        args.push(t);
    }
    client
        .query(&select.sql, &args)?
        .iter()
        .map(|r| q.decode(|i| r.try_get(i), |i| r.try_get(i), |i| r.try_get(i)))
        .collect()
}

/// Rows per INSERT statement: one round trip carries many rows (26 parameters each; PostgreSQL
/// takes up to 65,535 in a statement).
const ROWS_PER_STATEMENT: usize = 256;

impl Store for Client {
    fn insert(&mut self, rows: &[Row]) -> std::result::Result<(), WriteError> {
        let write = |client: &mut Client| -> std::result::Result<(), postgres::Error> {
            let mut tx = client.transaction()?;
            // Prepared once for a long batch's full chunks; a short one's single chunk is
            // prepared as it runs.
            let full = if rows.len() >= ROWS_PER_STATEMENT {
                Some(tx.prepare(&super::insert_sql(Dialect::Postgres, ROWS_PER_STATEMENT))?)
            } else {
                None
            };
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let values: Vec<Box<dyn ToSql + Sync>> = chunk
                    .iter()
                    .flat_map(super::values)
                    .map(sql_value)
                    .collect();
                let args: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v.as_ref()).collect();
                match &full {
                    Some(st) if chunk.len() == ROWS_PER_STATEMENT => tx.execute(st, &args)?,
                    _ => tx.execute(&super::insert_sql(Dialect::Postgres, chunk.len()), &args)?,
                };
            }
            tx.commit()
        };
        write(self).map_err(|e| {
            let why = chain(&e);
            // Data exceptions and integrity violations: these rows' values, not the store.
            match e.code().map(|c| c.code().get(..2)) {
                // The server's message, not its detail: the detail quotes the row's values.
                Some(Some("22" | "23")) => WriteError::Rejected(
                    e.as_db_error()
                        .map_or(why, |d| format!("{}: {}", d.code().code(), d.message())),
                ),
                _ => WriteError::Unavailable(why),
            }
        })
    }

    fn prune(&mut self, cutoff_ms: i64) -> std::result::Result<u64, String> {
        self.execute("DELETE FROM requests WHERE ts_ms < $1", &[&cutoff_ms])
            .map_err(|e| e.to_string())
    }
}
