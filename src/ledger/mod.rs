//! The usage ledger: one SQLite row per finished or refused request of a known tenant, for
//! chargeback. Rows are written off the hot path by one writer thread in batched transactions
//! (WAL); a failed batch is retried, and if the file cannot be written the server keeps serving,
//! counts the rows it lost (`hearth_ledger_rows_dropped_total`) and logs it. `flush` waits until
//! every row recorded before it is committed, so a usage query sees every request that finished
//! before it.
pub mod query;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use crate::error::{HearthError, Result};
use crate::telemetry::names;

pub use query::{GroupBy, UsageQuery, UsageRow};

/// One request, as billed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// When it finished (or was refused), Unix milliseconds.
    pub ts_ms: i64,
    pub request_id: String,
    pub tenant: String,
    /// A short hash of the API key (never the key); empty when the server runs open.
    pub key_id: String,
    /// The request's `user` label.
    pub user: Option<String>,
    /// Empty when refused before the model was known.
    pub model: String,
    /// The router's choice (empty until the router exists).
    pub route: String,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub prefill_device_ms: f64,
    pub decode_device_ms: f64,
    pub queue_ms: f64,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    /// stop, length, error, client_closed, or refused.
    pub finish_reason: String,
    pub status: u16,
    /// `exact` or `semantic` when the response cache answered; empty otherwise.
    pub cache: String,
    /// Device time the cached answer had taken (not spent again).
    pub saved_device_ms: f64,
    /// The response's answer-quality signals (none when nothing was generated).
    pub quality: Option<crate::quality::Quality>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

enum Msg {
    Row(Box<Row>),
    /// Answered once every row sent before it is committed (or given up on).
    Flush(flume::Sender<()>),
}

/// The writer's handle: record rows, flush, query, close.
pub struct Ledger {
    path: PathBuf,
    tx: Mutex<Option<flume::Sender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

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

/// Open the ledger's file for writing (creating it and its folder), with `schema` applied: WAL, so
/// that writers and readers of the same file (the ledger's, the response cache's copy, usage
/// queries) wait for each other rather than fail.
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
fn open_for_writing(path: &Path) -> rusqlite::Result<Connection> {
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

fn insert(conn: &mut Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO requests (ts_ms, request_id, tenant, key_id, user, model, route, \
             prompt_tokens, cached_tokens, completion_tokens, prefill_device_ms, decode_device_ms, \
             queue_ms, ttft_ms, e2e_ms, finish_reason, status, cache, saved_device_ms, \
             mean_logprob, p10_logprob, min_logprob, mean_entropy, mean_margin, repetition, \
             length_stop) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
             ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)",
        )?;
        for r in rows {
            st.execute(params![
                r.ts_ms,
                r.request_id,
                r.tenant,
                r.key_id,
                r.user,
                r.model,
                r.route,
                r.prompt_tokens as i64,
                r.cached_tokens as i64,
                r.completion_tokens as i64,
                r.prefill_device_ms,
                r.decode_device_ms,
                r.queue_ms,
                r.ttft_ms,
                r.e2e_ms,
                r.finish_reason,
                r.status,
                r.cache,
                r.saved_device_ms,
                r.quality.map(|q| q.mean_logprob),
                r.quality.map(|q| q.p10_logprob),
                r.quality.map(|q| q.min_logprob),
                r.quality.map(|q| q.mean_entropy),
                r.quality.and_then(|q| q.mean_margin),
                r.quality.map(|q| q.repetition),
                r.quality.map(|q| q.stopped_on_length),
            ])?;
        }
    }
    tx.commit()
}

/// The writer thread: batches whatever has arrived, commits it (three tries), answers flushes, and
/// prunes rows past the retention once an hour.
fn writer(path: PathBuf, retention_days: u32, rx: flume::Receiver<Msg>) {
    let mut conn: Option<Connection> = None;
    let mut last_open_try: Option<Instant> = None;
    let mut last_prune: Option<Instant> = None;
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(m) => Some(m),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        let mut rows = Vec::new();
        let mut flushes = Vec::new();
        for m in first.into_iter().chain(rx.try_iter().take(4096)) {
            match m {
                Msg::Row(r) => rows.push(*r),
                Msg::Flush(ack) => flushes.push(ack),
            }
        }
        if conn.is_none() && last_open_try.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
            last_open_try = Some(Instant::now());
            match open_for_writing(&path) {
                Ok(c) => conn = Some(c),
                Err(e) => tracing::error!(
                    path = %path.display(), error = %e,
                    "USAGE LEDGER UNWRITABLE: requests are served but their usage rows are lost"
                ),
            }
        }
        if !rows.is_empty() {
            let written = conn.as_mut().is_some_and(|c| {
                (0..3).any(|attempt| {
                    if attempt > 0 {
                        std::thread::sleep(Duration::from_millis(50 << attempt));
                    }
                    match insert(c, &rows) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, attempt, "ledger batch not written");
                            false
                        }
                    }
                })
            });
            if written {
                metrics::counter!(names::LEDGER_ROWS_WRITTEN).increment(rows.len() as u64);
            } else {
                tracing::error!(
                    path = %path.display(), rows = rows.len(),
                    "USAGE LEDGER: rows lost (the file cannot be written)"
                );
                metrics::counter!(names::LEDGER_ROWS_DROPPED).increment(rows.len() as u64);
                // Reopen on the next batch: the file may have come back.
                conn = None;
            }
        }
        for ack in flushes {
            let _ = ack.send(());
        }
        if retention_days > 0 && last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
        {
            last_prune = Some(Instant::now());
            if let Some(c) = &conn {
                let cutoff = now_ms() - i64::from(retention_days) * 86_400_000;
                match c.execute("DELETE FROM requests WHERE ts_ms < ?1", params![cutoff]) {
                    Ok(n) if n > 0 => tracing::info!(rows = n, retention_days, "ledger pruned"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ledger pruning failed"),
                }
            }
        }
    }
}

impl Ledger {
    /// Start the writer for the ledger at `path`. Never fails: an unwritable path is logged and
    /// its rows are counted as dropped, and the server serves on.
    pub fn open(path: &Path, retention_days: u32) -> Self {
        let (tx, rx) = flume::unbounded();
        let p = path.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || writer(p, retention_days, rx))
            .map_err(|e| tracing::error!(error = %e, "cannot start the ledger writer"))
            .ok();
        Self {
            path: path.to_path_buf(),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(writer),
        }
    }

    fn sender(&self) -> Option<flume::Sender<Msg>> {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn record(&self, row: Row) {
        let sent = self
            .sender()
            .is_some_and(|tx| tx.send(Msg::Row(Box::new(row))).is_ok());
        if !sent {
            metrics::counter!(names::LEDGER_ROWS_DROPPED).increment(1);
        }
    }

    /// Wait until every row recorded so far is committed (or given up on).
    pub async fn flush(&self) {
        let (ack, done) = flume::bounded(1);
        if self
            .sender()
            .is_some_and(|tx| tx.send(Msg::Flush(ack)).is_ok())
        {
            let _ = done.recv_async().await;
        }
    }

    /// Flush, stop the writer and wait for it (shutdown: no row recorded before this is lost).
    pub fn close(&self) {
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(tx);
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(w) = writer {
            let _ = w.join();
        }
    }

    /// Usage totals from the file (a reader of its own; WAL lets it run beside the writer).
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        query::run(&self.path, q)
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.close();
    }
}

impl From<rusqlite::Error> for HearthError {
    fn from(e: rusqlite::Error) -> Self {
        HearthError::Internal(format!("usage ledger: {e}"))
    }
}
