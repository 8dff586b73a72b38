//! The usage ledger in an embedded SQLite file (the default, `ledger_path`): WAL, so that the
//! writer, the response cache's copy and usage queries on the same file wait for each other
//! rather than fail.
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, params_from_iter, Connection, OpenFlags};

use super::query::{Dialect, UsageQuery, UsageRow};
use super::{Row, Store, Value, WriteError};
use crate::error::Result;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    user TEXT,
    model TEXT NOT NULL,
    route TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    prefill_device_ms REAL NOT NULL,
    decode_device_ms REAL NOT NULL,
    queue_ms REAL NOT NULL,
    ttft_ms REAL,
    e2e_ms REAL NOT NULL,
    finish_reason TEXT NOT NULL,
    status INTEGER NOT NULL,
    cache TEXT NOT NULL DEFAULT '',
    saved_device_ms REAL NOT NULL DEFAULT 0,
    mean_logprob REAL,
    p10_logprob REAL,
    min_logprob REAL,
    mean_entropy REAL,
    mean_margin REAL,
    repetition REAL,
    length_stop INTEGER
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
CREATE INDEX IF NOT EXISTS requests_tenant_ts ON requests (tenant, ts_ms);
";

/// Open the file for writing (creating it and its folder), with `schema` applied.
pub(crate) fn open_file(path: &Path, schema: &str) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // A failure here shows up as the open's error below.
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

/// Open (creating the file, its folder and the table) for writing.
pub(super) fn open_for_writing(path: &Path) -> rusqlite::Result<Connection> {
    let conn = open_file(path, SCHEMA)?;
    // A ledger written before the response cache existed gets its columns (old rows: no hit).
    let has_cache: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'cache'")?
        .exists([])?;
    if !has_cache {
        conn.execute_batch(
            "ALTER TABLE requests ADD COLUMN cache TEXT NOT NULL DEFAULT '';
             ALTER TABLE requests ADD COLUMN saved_device_ms REAL NOT NULL DEFAULT 0;",
        )?;
    }
    // ... and one from before the quality signals, theirs (old rows: not measured).
    let has_quality: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'mean_logprob'")?
        .exists([])?;
    if !has_quality {
        conn.execute_batch(
            "ALTER TABLE requests ADD COLUMN mean_logprob REAL;
             ALTER TABLE requests ADD COLUMN p10_logprob REAL;
             ALTER TABLE requests ADD COLUMN min_logprob REAL;
             ALTER TABLE requests ADD COLUMN mean_entropy REAL;
             ALTER TABLE requests ADD COLUMN mean_margin REAL;
             ALTER TABLE requests ADD COLUMN repetition REAL;
             ALTER TABLE requests ADD COLUMN length_stop INTEGER;",
        )?;
    }
    Ok(conn)
}

fn sql_value(v: Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match v {
        Value::Int(Some(i)) => V::Integer(i),
        Value::Real(Some(f)) => V::Real(f),
        Value::Text(Some(t)) => V::Text(t),
        Value::Bool(Some(b)) => V::Integer(i64::from(b)),
        Value::Int(None) | Value::Real(None) | Value::Text(None) | Value::Bool(None) => V::Null,
    }
}

impl Store for Connection {
    fn insert(&mut self, rows: &[Row]) -> std::result::Result<(), WriteError> {
        let write = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut st = tx.prepare_cached(&super::insert_sql(Dialect::Sqlite, 1))?;
                for r in rows {
                    st.execute(params_from_iter(
                        super::values(r).into_iter().map(sql_value),
                    ))?;
                }
            }
            tx.commit()
        };
        write(self).map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => WriteError::Rejected(e.to_string()),
            _ => WriteError::Unavailable(e.to_string()),
        })
    }

    fn prune(&mut self, cutoff_ms: i64) -> std::result::Result<u64, String> {
        self.execute("DELETE FROM requests WHERE ts_ms < ?1", params![cutoff_ms])
            .map(|n| n as u64)
            .map_err(|e| e.to_string())
    }
}

/// Usage totals from the file (a reader of its own, beside the writer); none if there is no file.
pub fn query(path: &Path, q: &UsageQuery) -> Result<Vec<UsageRow>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let select = q.select(Dialect::Sqlite);
    let mut args: Vec<rusqlite::types::Value> = vec![select.start_ms.into(), select.end_ms.into()];
    args.extend(select.tenant.map(Into::into));
    let mut st = conn.prepare(&select.sql)?;
    let rows = st.query_map(params_from_iter(args), |r| {
        q.decode(|i| r.get(i), |i| r.get(i), |i| r.get(i))
    })?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{GroupBy, Ledger, Target};

    fn row(tenant: &str, model: &str, user: Option<&str>, ts_ms: i64, prompt: u64) -> Row {
        Row {
            ts_ms,
            request_id: format!("r{ts_ms}"),
            tenant: tenant.into(),
            key_id: "k".into(),
            user: user.map(String::from),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: 2,
            prefill_device_ms: 1.5,
            decode_device_ms: 0.5,
            finish_reason: "stop".into(),
            status: 200,
            ..Default::default()
        }
    }

    #[test]
    fn groups_filters_and_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!("hearth-ledger-{}", std::process::id()));
        let path = dir.join("usage.sqlite3");
        let _ = std::fs::remove_dir_all(&dir);
        let day = 86_400_000;
        {
            let l = Ledger::open(Target::Sqlite(path.clone()), 0);
            l.record(row("a", "m1", Some("u1"), 10 * day, 10));
            l.record(row("a", "m2", None, 10 * day + 5, 20));
            l.record(row("b", "m1", Some("u2"), 11 * day, 40));
            l.close();
        }
        let l = Ledger::open(Target::Sqlite(path.clone()), 0);
        let all = l.query(&UsageQuery::default()).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (
                all[0].requests,
                all[0].prompt_tokens,
                all[0].completion_tokens
            ),
            (3, 70, 6)
        );
        assert!((all[0].device_time_ms - 6.0).abs() < 1e-9);
        let by = |g: &str, tenant: Option<&str>| {
            l.query(&UsageQuery {
                group_by: GroupBy::parse_list(g).unwrap(),
                tenant: tenant.map(String::from),
                ..Default::default()
            })
            .unwrap()
        };
        let t = by("tenant", None);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].tenant.as_deref(), t[0].requests), (Some("a"), 2));
        let d = by("day,tenant", None);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].day.as_deref(), Some("1970-01-11"));
        assert_eq!(d[1].day.as_deref(), Some("1970-01-12"));
        let only_b = by("model,user", Some("b"));
        assert_eq!(only_b.len(), 1);
        assert_eq!(only_b[0].user.as_deref(), Some("u2"));
        let range = l
            .query(&UsageQuery {
                start: Some(11 * 86_400),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(range[0].requests, 1);
        assert!(GroupBy::parse_list("tenant,cost").is_err());
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ledger_from_before_the_response_cache_and_quality_gains_their_columns() {
        let dir = std::env::temp_dir().join(format!("hearth-ledger-old-{}", std::process::id()));
        let path = dir.join("usage.sqlite3");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            // The table as it was: no cache columns, one row.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE requests (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, \
                 request_id TEXT NOT NULL, tenant TEXT NOT NULL, key_id TEXT NOT NULL, user TEXT, \
                 model TEXT NOT NULL, route TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, \
                 cached_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, \
                 prefill_device_ms REAL NOT NULL, decode_device_ms REAL NOT NULL, \
                 queue_ms REAL NOT NULL, ttft_ms REAL, e2e_ms REAL NOT NULL, \
                 finish_reason TEXT NOT NULL, status INTEGER NOT NULL);
                 INSERT INTO requests VALUES (1, 5, 'r', 'a', 'k', NULL, 'm', '', 1, 0, 1, 1.0, \
                 1.0, 0.0, NULL, 1.0, 'stop', 200);",
            )
            .unwrap();
        }
        let l = Ledger::open(Target::Sqlite(path.clone()), 0);
        l.record(Row {
            cache: "semantic".into(),
            saved_device_ms: 40.0,
            ..row("a", "m", None, 10, 3)
        });
        l.close();
        let l = Ledger::open(Target::Sqlite(path.clone()), 0);
        let all = l.query(&UsageQuery::default()).unwrap();
        assert_eq!((all[0].requests, all[0].cache_hits), (2, 1));
        assert!((all[0].saved_device_time_ms - 40.0).abs() < 1e-9);
        drop(l);
        // The quality columns came too: a row with signals, an old row without.
        let l = Ledger::open(Target::Sqlite(path.clone()), 0);
        l.record(Row {
            quality: Some(crate::quality::Quality {
                tokens: 4,
                mean_logprob: -0.5,
                p10_logprob: -1.5,
                min_logprob: -2.0,
                mean_entropy: 0.8,
                mean_margin: Some(3.0),
                repetition: 0.25,
                stopped_on_length: true,
            }),
            ..row("a", "m", None, 20, 3)
        });
        l.close();
        let c = Connection::open(&path).unwrap();
        let got: Vec<(Option<f64>, Option<f64>, Option<bool>)> = c
            .prepare("SELECT mean_logprob, mean_margin, length_stop FROM requests ORDER BY ts_ms")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<std::result::Result<_, rusqlite::Error>>()
            .unwrap();
        assert_eq!(got[0], (None, None, None));
        assert_eq!(got[2], (Some(-0.5), Some(3.0), Some(true)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
