//! Keeping the response cache across restarts (`[cache] persist = true`): every entry kept is also
//! written to a table of the ledger's SQLite file, every entry dropped (evicted, expired, replaced)
//! deleted from it, by one background writer in batched transactions, off the request path. At
//! start the entries not yet expired are read back, each into its own tenant's partition.
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use super::key::Digest;
use super::Answer;
use crate::error::Result;

/// One entry as stored.
#[derive(Debug, Clone)]
pub struct Saved {
    pub tenant: String,
    /// The model or route it answered for.
    pub scope: String,
    pub exact: Digest,
    pub semantic: Digest,
    /// The compared text and its embedding (absent when the entry has no semantic level).
    pub query: Option<(String, Vec<f32>)>,
    pub answer: Answer,
    /// Unix milliseconds.
    pub expires_ms: i64,
}

enum Msg {
    Put(Box<Saved>),
    Delete(String, Digest),
    Flush(flume::Sender<()>),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS response_cache (
    tenant TEXT NOT NULL,
    exact BLOB NOT NULL,
    semantic BLOB NOT NULL,
    text TEXT,
    vector BLOB,
    answer TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    scope TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, exact)
);
";

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = crate::ledger::open_file(path, SCHEMA)?;
    // Files written before entries had a scope (a route's own bound) gain the column.
    let has_scope = conn
        .prepare("SELECT 1 FROM pragma_table_info('response_cache') WHERE name = 'scope'")?
        .exists([])?;
    if !has_scope {
        conn.execute_batch("ALTER TABLE response_cache ADD COLUMN scope TEXT NOT NULL DEFAULT ''")?;
    }
    Ok(conn)
}

fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write(conn: &mut Connection, batch: &[Msg]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for m in batch {
        match m {
            Msg::Put(s) => {
                let answer = serde_json::to_string(&s.answer).unwrap_or_default();
                let (text, vector) = match &s.query {
                    Some((t, v)) => (Some(t.as_str()), Some(vector_bytes(v))),
                    None => (None, None),
                };
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO response_cache \
                     (tenant, exact, semantic, text, vector, answer, expires_ms, scope) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    s.tenant,
                    &s.exact[..],
                    &s.semantic[..],
                    text,
                    vector,
                    answer,
                    s.expires_ms,
                    s.scope
                ])?;
            }
            Msg::Delete(tenant, exact) => {
                tx.prepare_cached("DELETE FROM response_cache WHERE tenant = ?1 AND exact = ?2")?
                    .execute(params![tenant, &exact[..]])?;
            }
            Msg::Flush(_) => {}
        }
    }
    tx.commit()
}

/// The writer's handle.
pub struct Persist {
    tx: Mutex<Option<flume::Sender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Persist {
    /// Start the writer for the table in `path` (created on first write).
    pub fn start(path: &Path) -> Self {
        let (tx, rx) = flume::unbounded();
        let path: PathBuf = path.into();
        let writer = std::thread::Builder::new()
            .name("cache-persist".into())
            .spawn(move || writer(path, rx))
            .ok();
        Self {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(writer),
        }
    }

    fn send(&self, m: Msg) {
        if let Some(tx) = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = tx.send(m);
        }
    }

    pub fn put(&self, s: Saved) {
        self.send(Msg::Put(Box::new(s)));
    }

    pub fn delete(&self, tenant: &str, exact: Digest) {
        self.send(Msg::Delete(tenant.into(), exact));
    }

    /// Wait until everything sent before is written (or given up on).
    pub fn flush(&self) {
        let (tx, rx) = flume::bounded(1);
        self.send(Msg::Flush(tx));
        let _ = rx.recv_timeout(Duration::from_secs(10));
    }

    /// Write what is queued and stop the writer.
    pub fn close(&self) {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = w.join();
        }
    }
}

fn writer(path: PathBuf, rx: flume::Receiver<Msg>) {
    let mut conn = None;
    while let Ok(first) = rx.recv() {
        let batch: Vec<Msg> = std::iter::once(first)
            .chain(rx.try_iter().take(4096))
            .collect();
        if conn.is_none() {
            match open(&path) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "response cache not persisted")
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            if let Err(e) = write(c, &batch) {
                tracing::warn!(error = %e, "response cache entries not persisted");
            }
        }
        for m in batch {
            if let Msg::Flush(ack) = m {
                let _ = ack.send(());
            }
        }
    }
}

fn digest(b: Vec<u8>) -> Option<Digest> {
    b.try_into().ok()
}

/// The entries of `path` not expired at `now_ms`, oldest written first (the expired ones are
/// deleted). A missing file or table is an empty cache; a row that cannot be read is skipped.
pub fn load(path: &Path, now_ms: i64) -> Result<Vec<Saved>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn =
        open(path).map_err(|e| crate::HearthError::Config(format!("{}: {e}", path.display())))?;
    let read = |conn: &Connection| -> rusqlite::Result<Vec<Saved>> {
        conn.execute(
            "DELETE FROM response_cache WHERE expires_ms <= ?1",
            [now_ms],
        )?;
        let mut st = conn.prepare(
            "SELECT tenant, exact, semantic, text, vector, answer, expires_ms, scope \
             FROM response_cache ORDER BY rowid",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (tenant, exact, semantic, text, vector, answer, expires_ms, scope) = row?;
            let parsed = (|| {
                let query = match (text, vector) {
                    (Some(t), Some(v)) if v.len() % 4 == 0 => Some((
                        t,
                        v.chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                    )),
                    _ => None,
                };
                Some(Saved {
                    tenant,
                    scope,
                    exact: digest(exact)?,
                    semantic: digest(semantic)?,
                    query,
                    answer: serde_json::from_str(&answer).ok()?,
                    expires_ms,
                })
            })();
            match parsed {
                Some(s) => out.push(s),
                None => {
                    tracing::warn!("a persisted response-cache entry could not be read; skipped")
                }
            }
        }
        Ok(out)
    };
    read(&conn).map_err(|e| crate::HearthError::Config(format!("{}: {e}", path.display())))
}

/// Opened read-only, for tests and tools: how many entries the file holds.
pub fn count(path: &Path) -> usize {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row("SELECT COUNT(*) FROM response_cache", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map_or(0, |n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_from_before_scopes_gains_the_column_and_keeps_its_rows() {
        let dir = std::env::temp_dir().join(format!("hearth-persist-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.sqlite3");
        let answer = r#"{"text":"Paris","logprobs":[],"reason":"stop","prompt_tokens":3,
            "completion_tokens":1,"cached_tokens":0,"device_ms":5.0,"route":null}"#;
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE response_cache (tenant TEXT NOT NULL, exact BLOB NOT NULL,
                 semantic BLOB NOT NULL, text TEXT, vector BLOB, answer TEXT NOT NULL,
                 expires_ms INTEGER NOT NULL, PRIMARY KEY (tenant, exact));",
            )
            .unwrap();
            c.execute(
                "INSERT INTO response_cache VALUES ('a', ?1, ?2, NULL, NULL, ?3, ?4)",
                params![&[1u8; 32][..], &[2u8; 32][..], answer, i64::MAX],
            )
            .unwrap();
        }
        let saved = load(&path, 0).unwrap();
        assert_eq!(saved.len(), 1);
        assert_eq!(
            (saved[0].tenant.as_str(), saved[0].scope.as_str()),
            ("a", "")
        );
        assert_eq!(saved[0].answer.text, "Paris");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
