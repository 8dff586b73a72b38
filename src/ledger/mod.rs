//! The usage ledger: one row per finished or refused request of a known tenant, for chargeback,
//! in an embedded SQLite file (the default) or in PostgreSQL (`ledger_url`, one ledger for every
//! replica). Rows are written off the hot path by one writer thread in batched transactions.
//! While the store cannot be written (a full disk, a database restarting) its rows wait in memory
//! and are retried, up to `MAX_PENDING`; only past that are they lost, counted
//! (`hearth_ledger_rows_dropped_total`) and logged, and the server serves on throughout. `flush`
//! waits until every row recorded before it is committed (or waiting for the store), so a usage
//! query sees every request that finished before it.
pub mod postgres;
pub mod query;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{HearthError, Result};
use crate::telemetry::names;

pub use self::postgres::PgTarget;
pub(crate) use self::sqlite::open_file;
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

/// Rows kept in memory while the store is down (about 300 bytes each); older ones are lost first.
const MAX_PENDING: usize = 100_000;
/// How often a store that failed is tried again.
const REOPEN_AFTER: Duration = Duration::from_secs(5);
/// Rows per transaction.
const BATCH: usize = 4096;
/// The longest a usage query waits for the writer to commit what came before it.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// Where the ledger is kept.
#[derive(Clone)]
pub enum Target {
    Sqlite(PathBuf),
    Postgres(Box<PgTarget>),
}

impl Target {
    /// A `postgres://` (or `postgresql://`) URL, else a SQLite file's path.
    pub fn parse(s: &str, ca_file: Option<&Path>) -> Result<Self> {
        if is_url(s) {
            return Ok(Self::Postgres(Box::new(PgTarget::parse(s, ca_file)?)));
        }
        if s.contains("://") {
            return Err(HearthError::Config(format!(
                "ledger: a `{}://` URL is neither a postgres:// URL nor a file path",
                s.split("://").next().unwrap_or_default()
            )));
        }
        Ok(Self::Sqlite(s.into()))
    }

    fn open_writer(&self) -> std::result::Result<Box<dyn Store>, String> {
        match self {
            Self::Sqlite(p) => sqlite::open_for_writing(p)
                .map(|c| Box::new(c) as Box<dyn Store>)
                .map_err(|e| e.to_string()),
            Self::Postgres(pg) => pg
                .open_for_writing()
                .map(|c| Box::new(c) as Box<dyn Store>)
                .map_err(|e| postgres::chain(&e)),
        }
    }

    /// One usage query, on a connection of its own (the `hearth usage` export).
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        self.query_on(&Mutex::new(None), q)
    }

    /// A usage query; a PostgreSQL one on the connection kept in `reader`.
    fn query_on(
        &self,
        reader: &Mutex<Option<::postgres::Client>>,
        q: &UsageQuery,
    ) -> Result<Vec<UsageRow>> {
        match self {
            Self::Sqlite(p) => sqlite::query(p, q),
            Self::Postgres(pg) => pg.query(reader, q),
        }
    }
}

/// Whether a ledger setting names a PostgreSQL database.
pub fn is_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The file's path, or the URL without its password.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "{}", p.display()),
            Self::Postgres(pg) => write!(f, "{pg}"),
        }
    }
}

/// What the writer needs of a store.
trait Store {
    /// All of `rows` in one transaction, or none of them.
    fn insert(&mut self, rows: &[Row]) -> std::result::Result<(), WriteError>;
    /// Delete the rows older than `cutoff_ms`; how many went.
    fn prune(&mut self, cutoff_ms: i64) -> std::result::Result<u64, String>;
}

/// Why rows were not written.
enum WriteError {
    /// The store refuses the rows' values: trying them again cannot help.
    Rejected(String),
    /// The store cannot be reached or written (down, full, read-only): the rows wait.
    Unavailable(String),
}

/// A column's value, for either store.
enum Value {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Bool(Option<bool>),
}

/// The columns a row fills, in the order of `values`.
const COLUMNS: [&str; 26] = [
    "ts_ms",
    "request_id",
    "tenant",
    "key_id",
    "\"user\"",
    "model",
    "route",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "prefill_device_ms",
    "decode_device_ms",
    "queue_ms",
    "ttft_ms",
    "e2e_ms",
    "finish_reason",
    "status",
    "cache",
    "saved_device_ms",
    "mean_logprob",
    "p10_logprob",
    "min_logprob",
    "mean_entropy",
    "mean_margin",
    "repetition",
    "length_stop",
];

/// An insert of `rows` rows at once.
fn insert_sql(d: query::Dialect, rows: usize) -> String {
    let tuples: Vec<String> = (0..rows)
        .map(|r| {
            let params: Vec<String> = (1..=COLUMNS.len())
                .map(|c| d.param(r * COLUMNS.len() + c))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO requests ({}) VALUES {}",
        COLUMNS.join(", "),
        tuples.join(", ")
    )
}

fn values(r: &Row) -> [Value; 26] {
    let text = |s: &str| Value::Text(Some(s.to_owned()));
    let int = |i: u64| Value::Int(Some(i64::try_from(i).unwrap_or(i64::MAX)));
    let real = |f: f64| Value::Real(Some(f));
    let q = r.quality.as_ref();
    [
        Value::Int(Some(r.ts_ms)),
        text(&r.request_id),
        text(&r.tenant),
        text(&r.key_id),
        Value::Text(r.user.clone()),
        text(&r.model),
        text(&r.route),
        int(r.prompt_tokens),
        int(r.cached_tokens),
        int(r.completion_tokens),
        real(r.prefill_device_ms),
        real(r.decode_device_ms),
        real(r.queue_ms),
        Value::Real(r.ttft_ms),
        real(r.e2e_ms),
        text(&r.finish_reason),
        int(u64::from(r.status)),
        text(&r.cache),
        real(r.saved_device_ms),
        Value::Real(q.map(|q| q.mean_logprob)),
        Value::Real(q.map(|q| q.p10_logprob)),
        Value::Real(q.map(|q| q.min_logprob)),
        Value::Real(q.map(|q| q.mean_entropy)),
        Value::Real(q.and_then(|q| q.mean_margin)),
        Value::Real(q.map(|q| q.repetition)),
        Value::Bool(q.map(|q| q.stopped_on_length)),
    ]
}

enum Msg {
    Row(Box<Row>),
    /// Answered once every row sent before it is committed (or waiting for the store).
    Flush(flume::Sender<()>),
}

/// What writing the pending rows did.
#[derive(Default)]
struct Round {
    written: usize,
    rejected: usize,
    /// Why the store stopped taking rows, if it did (the rest wait).
    failed: Option<String>,
}

/// Write `pending`, oldest first, in batches, until it is empty or the store fails. A batch the
/// store refuses for its values is written again row by row, and only the refused rows are
/// dropped: one bad row does not hold up the others.
fn write_pending(store: &mut dyn Store, pending: &mut Vec<Row>, target: &Target) -> Round {
    let mut round = Round::default();
    while !pending.is_empty() {
        let n = pending.len().min(BATCH);
        match store.insert(&pending[..n]) {
            Ok(()) => {
                pending.drain(..n);
                round.written += n;
            }
            Err(WriteError::Unavailable(e)) => {
                round.failed = Some(e);
                return round;
            }
            Err(WriteError::Rejected(_)) => {
                let mut batch = pending.drain(..n).collect::<Vec<_>>().into_iter();
                while let Some(row) = batch.next() {
                    match store.insert(std::slice::from_ref(&row)) {
                        Ok(()) => round.written += 1,
                        Err(WriteError::Rejected(e)) => {
                            round.rejected += 1;
                            tracing::error!(
                                ledger = %target, request_id = %row.request_id, error = %e,
                                "USAGE LEDGER: a row the store refuses is lost"
                            );
                        }
                        Err(WriteError::Unavailable(e)) => {
                            pending.splice(0..0, std::iter::once(row).chain(batch));
                            round.failed = Some(e);
                            return round;
                        }
                    }
                }
            }
        }
    }
    round
}

/// The writer thread: gathers whatever has arrived, commits what is pending, answers flushes,
/// retries a failed store every `REOPEN_AFTER`, and prunes rows past the retention once an hour.
fn writer(target: Target, retention_days: u32, rx: flume::Receiver<Msg>) {
    let mut last_prune: Option<Instant> = None;
    let mut pending: Vec<Row> = Vec::new();
    // Whether the store is known to be failing (logged once per outage).
    let mut down = false;
    let report = |failed: Option<&str>, pending: usize, down: &mut bool| match failed {
        Some(e) if !*down => {
            *down = true;
            tracing::error!(
                ledger = %target, error = %e, rows = pending,
                "USAGE LEDGER UNWRITABLE: requests are served, their usage rows wait in memory and are retried"
            );
        }
        Some(e) => tracing::debug!(ledger = %target, error = %e, "ledger still unwritable"),
        None if std::mem::take(down) => {
            tracing::info!(ledger = %target, "usage ledger writable again")
        }
        None => {}
    };
    let open = |pending: usize, down: &mut bool| {
        target
            .open_writer()
            .map_err(|e| report(Some(&e), pending, down))
            .ok()
    };
    // Opened at once, so that a wrong URL, password or path is in the log at start-up.
    tracing::info!(ledger = %target, "usage ledger");
    let mut last_open_try = Some(Instant::now());
    let mut store = open(0, &mut down);
    loop {
        // With rows waiting for the store, wake up to try it again.
        let wait = if pending.is_empty() {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(1)
        };
        let (first, closing) = match rx.recv_timeout(wait) {
            Ok(m) => (Some(m), false),
            Err(flume::RecvTimeoutError::Timeout) => (None, false),
            Err(flume::RecvTimeoutError::Disconnected) => (None, true),
        };
        let mut flushes = Vec::new();
        for m in first.into_iter().chain(rx.try_iter().take(BATCH)) {
            match m {
                Msg::Row(r) => pending.push(*r),
                Msg::Flush(ack) => flushes.push(ack),
            }
        }
        // A failed store is tried again every REOPEN_AFTER, and once more at shutdown.
        if store.is_none() && (closing || last_open_try.is_none_or(|t| t.elapsed() > REOPEN_AFTER))
        {
            last_open_try = Some(Instant::now());
            store = open(pending.len(), &mut down);
        }
        let ready = if pending.is_empty() {
            None
        } else {
            store.take()
        };
        if let Some(mut s) = ready {
            let mut round = write_pending(s.as_mut(), &mut pending, &target);
            if round.failed.is_some() {
                // A connection that sat idle may have been closed under the writer (a database
                // restart, an idle timeout): one new connection is tried at once, so that a
                // flush is not answered while rows it could have had are waiting.
                drop(s);
                last_open_try = Some(Instant::now());
                if let Ok(mut again) = target.open_writer() {
                    let more = write_pending(again.as_mut(), &mut pending, &target);
                    round.written += more.written;
                    round.rejected += more.rejected;
                    round.failed = more.failed;
                    if round.failed.is_none() {
                        store = Some(again);
                    }
                }
            } else {
                store = Some(s);
            }
            metrics::counter!(names::LEDGER_ROWS_WRITTEN).increment(round.written as u64);
            metrics::counter!(names::LEDGER_ROWS_DROPPED).increment(round.rejected as u64);
            report(round.failed.as_deref(), pending.len(), &mut down);
        }
        let lost = if closing {
            pending.len()
        } else {
            pending.len().saturating_sub(MAX_PENDING)
        };
        if lost > 0 {
            pending.drain(..lost);
            tracing::error!(
                ledger = %target, rows = lost,
                "USAGE LEDGER: rows lost (the store could not be written)"
            );
            metrics::counter!(names::LEDGER_ROWS_DROPPED).increment(lost as u64);
        }
        metrics::gauge!(names::LEDGER_ROWS_PENDING).set(pending.len() as f64);
        for ack in flushes {
            let _ = ack.send(());
        }
        if closing {
            break;
        }
        if retention_days > 0 && last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600))
        {
            if let Some(s) = store.as_mut() {
                last_prune = Some(Instant::now());
                let cutoff = now_ms() - i64::from(retention_days) * 86_400_000;
                match s.prune(cutoff) {
                    Ok(n) if n > 0 => tracing::info!(rows = n, retention_days, "ledger pruned"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ledger pruning failed"),
                }
            }
        }
    }
}

/// The writer's handle: record rows, flush, query, close.
pub struct Ledger {
    target: Target,
    /// The usage queries' connection to PostgreSQL, kept between queries.
    reader: Mutex<Option<::postgres::Client>>,
    tx: Mutex<Option<flume::Sender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Ledger {
    /// Start the writer for the ledger at `target`. Never fails: an unwritable store is logged,
    /// its rows wait (see the module's note), and the server serves on.
    pub fn open(target: Target, retention_days: u32) -> Self {
        let (tx, rx) = flume::unbounded();
        let t = target.clone();
        let writer = std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || writer(t, retention_days, rx))
            .map_err(|e| tracing::error!(error = %e, "cannot start the ledger writer"))
            .ok();
        Self {
            target,
            reader: Mutex::new(None),
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

    /// Wait until every row recorded so far is committed (or waiting for the store), or for
    /// `FLUSH_WAIT` at most: a store that hangs does not hang its readers.
    pub async fn flush(&self) {
        let (ack, done) = flume::bounded(1);
        if self
            .sender()
            .is_some_and(|tx| tx.send(Msg::Flush(ack)).is_ok())
        {
            let _ = tokio::time::timeout(FLUSH_WAIT, done.recv_async()).await;
        }
    }

    /// Flush, stop the writer and wait for it (shutdown: no row recorded before this is lost,
    /// unless the store cannot be written).
    pub fn close(&self) {
        drop(take(&self.tx));
        if let Some(w) = take(&self.writer) {
            let _ = w.join();
        }
        // The PostgreSQL client blocks on a runtime of its own when dropped, which a thread of
        // the server's runtime may not do: it is dropped on a plain thread.
        if let Some(r) = take(&self.reader) {
            let _ = std::thread::spawn(move || drop(r)).join();
        }
    }

    /// Usage totals (blocking: call it off the async runtime).
    pub fn query(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        self.target.query_on(&self.reader, q)
    }
}

/// What `slot` holds, taken out (a panicked holder's lock still gives it up).
fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
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
