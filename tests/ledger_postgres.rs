//! The usage ledger in PostgreSQL (`ledger_url`), against a real server (Debian's `postgresql`,
//! started per test by tests/common/postgres.rs): the same answers as the SQLite file for every
//! query, two Hearth replicas writing one ledger that either one reads whole, rows that wait out a
//! database outage and are written when it ends, and TLS verified against a private CA.
//! Skipped, saying so, only where PostgreSQL is not installed.
mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::postgres::PgServer;
use common::TestServer;
use hearth::ledger::{GroupBy, Ledger, Row, Target, UsageQuery, UsageRow};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

/// One test at a time: the ledger's gauges are process-wide, and two servers are enough for two
/// cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const DAY_MS: i64 = 86_400_000;

/// Rows that exercise every grouping: tenants whose byte order differs from a locale's, users
/// absent, empty and set, three days, cache hits and misses, quality signals or none.
fn sample_rows() -> Vec<Row> {
    let tenants = ["team-a", "Team-B", "team-c"];
    let models = ["smol", "gemma"];
    let users = [None, Some(""), Some("alice"), Some("Bob")];
    let caches = ["", "", "exact", "semantic"];
    // More than one full INSERT statement of PostgreSQL rows (256), and a partial one.
    (0..600u64)
        .map(|i| Row {
            ts_ms: 20_000 * DAY_MS + (i % 3) as i64 * DAY_MS + i as i64 * 1000,
            request_id: format!("req-{i}"),
            tenant: tenants[i as usize % 3].into(),
            key_id: "k".into(),
            user: users[(i as usize / 3) % 4].map(String::from),
            model: models[(i as usize / 2) % 2].into(),
            route: String::new(),
            prompt_tokens: 10 + i * 7,
            cached_tokens: i % 5,
            completion_tokens: 1 + i % 9,
            prefill_device_ms: 1.25 * i as f64,
            decode_device_ms: 0.5 + i as f64 / 8.0,
            queue_ms: 0.1,
            ttft_ms: (i % 2 == 0).then_some(3.0),
            e2e_ms: 9.0,
            finish_reason: "stop".into(),
            status: if i % 11 == 0 { 400 } else { 200 },
            cache: caches[i as usize % 4].into(),
            saved_device_ms: if i % 4 >= 2 { 40.0 + i as f64 } else { 0.0 },
            quality: (i % 3 == 1).then_some(hearth::quality::Quality {
                tokens: 4,
                mean_logprob: -0.5,
                p10_logprob: -1.5,
                min_logprob: -2.0,
                mean_entropy: 0.8,
                mean_margin: (i % 2 == 0).then_some(3.0),
                repetition: 0.25,
                stopped_on_length: i % 2 == 1,
            }),
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(1.0)
}

fn same(a: &[UsageRow], b: &[UsageRow]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let ints = |r: &UsageRow| {
                (
                    r.tenant.clone(),
                    r.model.clone(),
                    r.user.clone(),
                    r.day.clone(),
                    r.requests,
                    r.prompt_tokens,
                    r.cached_tokens,
                    r.completion_tokens,
                    r.cache_hits,
                )
            };
            ints(x) == ints(y)
                && close(x.device_time_ms, y.device_time_ms)
                && close(x.saved_device_time_ms, y.saved_device_time_ms)
        })
}

#[test]
fn postgres_answers_every_usage_query_as_the_sqlite_file_does() {
    let _one = serial();
    let Some(pg) = PgServer::start("parity") else {
        return;
    };
    let file = pg.dir.join("usage.sqlite3");
    let targets = [
        Target::Sqlite(file.clone()),
        Target::parse(&pg.url(), None).unwrap(),
    ];
    let rows = sample_rows();
    for t in &targets {
        let l = Ledger::open(t.clone(), 0);
        for r in &rows {
            l.record(r.clone());
        }
        l.close();
    }
    // Totals against the rows themselves.
    let total = targets[1].query(&UsageQuery::default()).unwrap();
    let device: f64 = rows
        .iter()
        .map(|r| r.prefill_device_ms + r.decode_device_ms)
        .sum();
    assert_eq!(total.len(), 1);
    assert_eq!(total[0].requests, 600);
    assert_eq!(
        total[0].prompt_tokens,
        rows.iter().map(|r| r.prompt_tokens).sum::<u64>()
    );
    assert_eq!(
        total[0].cache_hits,
        rows.iter().filter(|r| !r.cache.is_empty()).count() as u64
    );
    assert!(close(total[0].device_time_ms, device));

    // Every grouping, with and without a tenant, over every range: the same rows, in the same
    // order, from both stores.
    let fields = [GroupBy::Tenant, GroupBy::Model, GroupBy::User, GroupBy::Day];
    let day_s = DAY_MS / 1000;
    let ranges = [
        (None, None),
        (Some(20_001 * day_s), None),
        (None, Some(20_001 * day_s + 10)),
        (Some(30_000 * day_s), None),
    ];
    let mut compared = 0;
    for mask in 0..16u32 {
        let group_by: Vec<GroupBy> = (0..4)
            .filter(|b| mask & (1 << b) != 0)
            .map(|b| fields[b])
            .collect();
        for tenant in [None, Some("Team-B".to_string())] {
            for (start, end) in ranges {
                let q = UsageQuery {
                    start,
                    end,
                    tenant: tenant.clone(),
                    group_by: group_by.clone(),
                };
                let (sqlite, postgres) =
                    (targets[0].query(&q).unwrap(), targets[1].query(&q).unwrap());
                assert!(
                    same(&sqlite, &postgres),
                    "{q:?}\nsqlite:   {sqlite:?}\npostgres: {postgres:?}"
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 128);
    let by_tenant = targets[1]
        .query(&UsageQuery {
            group_by: vec![GroupBy::Tenant, GroupBy::Day],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_tenant[0].tenant.as_deref(), Some("Team-B"), "byte order");
    assert_eq!(by_tenant[0].day.as_deref(), Some("2024-10-05"));

    // Retention prunes old rows in both stores alike.
    for t in &targets {
        let l = Ledger::open(t.clone(), 1);
        l.record(Row {
            ts_ms: hearth::ledger::now_ms(),
            ..rows[0].clone()
        });
        l.close();
        let left = t.query(&UsageQuery::default()).unwrap();
        assert_eq!(left[0].requests, 1, "{t}: only the fresh row is kept");
    }
}

fn replica(name: &str, url: &str) -> TestServer {
    let url = url.to_string();
    TestServer::named(name, move |c| {
        c.admin_api_keys = vec!["sk-admin".into()];
        c.tenants = vec![
            TenantConfig::new("team-a", &["sk-a"]),
            TenantConfig::new("team-b", &["sk-b"]),
        ];
        c.ledger_url = Some(url);
    })
}

fn usage(base: &str, key: &str, query: &str) -> (u16, Value) {
    let (status, v, _) = common::call(base, "GET", &format!("/v1/usage{query}"), Some(key), None);
    (status, v)
}

fn complete(base: &str, key: &str, body: &Value, path: &str) -> u64 {
    let (status, v, _) = common::call(base, "POST", path, Some(key), Some(body));
    assert_eq!(status, 200, "{v}");
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

#[test]
fn two_replicas_write_one_ledger_and_either_reads_both() {
    let _one = serial();
    let Some(pg) = PgServer::start("replicas") else {
        return;
    };
    let (a, b) = (
        replica("pg-shared", &pg.url()),
        replica("pg-shared", &pg.url()),
    );
    let text = json!({"model": "pg-shared", "prompt": "The capital of France is", "max_tokens": 3, "user": "alice"});
    let chat = json!({"model": "pg-shared", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});
    let mut prompt_a = complete(&a.base, "sk-a", &text, "/v1/completions");
    prompt_a += complete(&b.base, "sk-a", &chat, "/v1/chat/completions");
    let prompt_b = complete(&b.base, "sk-b", &text, "/v1/completions");
    // A refusal on replica A is a row too.
    let bad = json!({"model": "pg-shared", "prompt": "x", "temperature": -1});
    let (status, _, _) = common::call(&a.base, "POST", "/v1/completions", Some("sk-b"), Some(&bad));
    assert_eq!(status, 400);

    // Each replica's query commits its own rows first; after one query on each, both see all.
    let first_a = usage(&a.base, "sk-admin", "?group_by=tenant");
    let from_b = usage(&b.base, "sk-admin", "?group_by=tenant");
    let from_a = usage(&a.base, "sk-admin", "?group_by=tenant");
    assert_eq!(from_b.0, 200, "{}", from_b.1);
    assert_eq!(from_a, from_b, "both replicas read one ledger");
    let rows = from_b.1["data"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["tenant"], "team-a");
    assert_eq!(rows[0]["requests"], 2, "one on each replica: {rows:?}");
    assert_eq!(rows[0]["prompt_tokens"], prompt_a);
    assert_eq!(rows[1]["tenant"], "team-b");
    assert_eq!(
        rows[1]["requests"], 2,
        "served on B, refused on A: {rows:?}"
    );
    assert_eq!(rows[1]["prompt_tokens"], prompt_b);
    assert!(first_a.0 == 200);

    // A tenant key reads only its own tenant, on either replica.
    let mine = usage(&a.base, "sk-b", "?group_by=tenant,user").1;
    let mine = mine["data"].as_array().unwrap();
    assert!(mine.iter().all(|r| r["tenant"] == "team-b"), "{mine:?}");
    let (status, _) = usage(&b.base, "sk-b", "?tenant=team-a");
    assert_eq!(status, 403);

    // Both replicas' rows by day: today's date (UTC), in PostgreSQL as in the API's contract.
    let days = usage(&b.base, "sk-admin", "?group_by=day").1;
    let day = days["data"][0]["day"].as_str().unwrap().to_string();
    assert_eq!(days["data"][0]["requests"], 4);
    assert_eq!(day.len(), 10, "{day}");

    // The export command reads the same database.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "usage",
            "--ledger",
            &pg.url(),
            "--group-by",
            "tenant",
            "--format",
            "csv",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[1].starts_with("team-a,2,"), "{csv}");
    assert!(lines[2].starts_with("team-b,2,"), "{csv}");

    // Queries right after requests, again and again: each sees the request before it (a query
    // with nothing to write must not leave the writer without its connection).
    for i in 1..=3 {
        complete(&a.base, "sk-a", &text, "/v1/completions");
        let mine = usage(&a.base, "sk-a", "").1;
        assert_eq!(mine["data"][0]["requests"], 2 + i, "{mine}");
    }
}

#[test]
fn rows_wait_out_a_database_outage_and_none_is_lost() {
    let _one = serial();
    let Some(pg) = PgServer::start("outage") else {
        return;
    };
    let s = replica("pg-outage", &pg.url());
    let body = json!({"model": "pg-outage", "prompt": "Hello", "max_tokens": 2});
    complete(&s.base, "sk-a", &body, "/v1/completions");
    assert_eq!(usage(&s.base, "sk-a", "").1["data"][0]["requests"], 1);
    let dropped = s.metric("hearth_ledger_rows_dropped_total").unwrap_or(0.0);

    pg.stop();
    for _ in 0..2 {
        complete(&s.base, "sk-a", &body, "/v1/completions");
    }
    let (status, v) = usage(&s.base, "sk-a", "");
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "ledger_unavailable", "{v}");
    assert!(
        !v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&pg.port.to_string()),
        "the caller is not told where the database is: {v}"
    );
    assert_eq!(s.metric("hearth_ledger_rows_pending"), Some(2.0));

    pg.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, v) = usage(&s.base, "sk-a", "");
        if status == 200 && v["data"][0]["requests"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiting rows reach the database once it is back: {status} {v}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(s.metric("hearth_ledger_rows_pending"), Some(0.0));

    // A restart while the replica is idle closes its connections under it: the next row and
    // query go over new ones at once, with no wait.
    pg.stop();
    pg.resume();
    complete(&s.base, "sk-a", &body, "/v1/completions");
    let (status, v) = usage(&s.base, "sk-a", "");
    assert_eq!((status, &v["data"][0]["requests"]), (200, &json!(4)), "{v}");
    assert_eq!(
        s.metric("hearth_ledger_rows_dropped_total").unwrap_or(0.0),
        dropped
    );

    // Shut down inside the server's runtime, with the reader's connection open: the ledger's
    // PostgreSQL clients are closed off the runtime's threads (no "runtime within a runtime").
    let mut s = s;
    let server = s.server.take().unwrap();
    s.rt.block_on(async move {
        server.shutdown(Duration::from_secs(5)).await;
    });
}

#[test]
fn a_row_the_database_refuses_is_dropped_alone() {
    let _one = serial();
    let Some(pg) = PgServer::start("refused") else {
        return;
    };
    let t = Target::parse(&pg.url(), None).unwrap();
    // A rule of the database's owner that one row breaks (as a NUL byte or an out-of-range value
    // would): the batch fails, and is written again row by row.
    let l = Ledger::open(t.clone(), 0);
    l.record(sample_rows().remove(0));
    l.close();
    let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    c.batch_execute(
        "ALTER TABLE requests ADD CONSTRAINT no_evil CHECK (request_id <> 'evil'); DELETE FROM requests",
    )
    .unwrap();
    let l = Ledger::open(t.clone(), 0);
    let mut rows = sample_rows();
    rows[5].request_id = "evil".into();
    for r in rows.iter().take(10) {
        l.record(r.clone());
    }
    l.close();
    let written = t.query(&UsageQuery::default()).unwrap()[0].requests;
    assert_eq!(written, 9, "only the refused row is lost");
}

#[test]
fn tls_is_verified_against_the_configured_ca() {
    let _one = serial();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let Some(pg) = PgServer::start_with("tls", |data| {
        std::fs::write(data.join("server.crt"), server_cert.pem()).unwrap();
        let key = data.join("server.key");
        std::fs::write(&key, server_key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        "-c ssl=on".into()
    }) else {
        return;
    };
    let ca_file = pg.dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let url = format!("{}?sslmode=require", pg.url());

    let t = Target::parse(&url, Some(&ca_file)).unwrap();
    let l = Ledger::open(t.clone(), 0);
    l.record(sample_rows().remove(1));
    l.close();
    assert_eq!(t.query(&UsageQuery::default()).unwrap()[0].requests, 1);

    // Without the CA, the server's certificate is not trusted: no connection.
    let untrusted = Target::parse(&url, None).unwrap();
    let err = untrusted
        .query(&UsageQuery::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unavailable") && err.contains("certificate"),
        "{err}"
    );
    // A CA file but no TLS asked for is a configuration error, not a silent plain connection.
    assert!(Target::parse(&pg.url(), Some(&ca_file)).is_err());
    // libpq's spellings: verify-full, and the CA as sslrootcert.
    let libpq = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        ca_file.display()
    );
    let t = Target::parse(&libpq, None).unwrap();
    assert_eq!(t.query(&UsageQuery::default()).unwrap()[0].requests, 1);
}

#[test]
fn a_ledger_url_that_is_not_postgres_is_refused_at_start() {
    for (url, why) in [
        ("mysql://db/usage", "postgres"),
        ("postgres://", "host"),
        ("postgres://h/db?sslmode=sometimes", "sslmode"),
    ] {
        let cfg = hearth::config::Config {
            ledger_url: Some(url.into()),
            ..Default::default()
        };
        let err = cfg
            .ledger()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(why), "{url}: {err}");
    }
    let file = hearth::config::Config::default().ledger().unwrap();
    assert!(matches!(file, Some(Target::Sqlite(_))));
    // Logs and errors name the database, never its password.
    let shown = Target::parse("postgres://billing:s3cret@db.internal:6432/usage", None)
        .unwrap()
        .to_string();
    assert_eq!(shown, "postgres://billing@db.internal:6432/usage");
}
