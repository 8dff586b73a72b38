//! KV-cache events for prefix-aware routers (llm-d's router, the Gateway API Inference Extension's
//! precise prefix scorer), in vLLM's wire format so they read Hearth as they read vLLM: a ZeroMQ
//! PUB socket sends three-frame messages (topic `kv@<pod>@<model>`, an 8-byte big-endian sequence
//! number, a msgpack `EventBatch[ts, events, data_parallel_rank]`), and a ROUTER socket replays
//! the buffered batches from a sequence number a subscriber asks for.
//!
//! The engines only hand their index changes to a channel; encoding and sending happen on a task
//! of their own. Events carry tenants' prompt token ids: off unless `kv_events_endpoint` is set,
//! and bound to the interface it names.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::engine::block_pool::KvEvent;
use crate::error::{HearthError, Result};

/// Batches kept for replay (vLLM keeps as many).
const REPLAY_BATCHES: usize = 10_000;

/// Batches that may wait for the publisher before an engine drops one (and logs it).
const QUEUED_BATCHES: usize = 4096;

/// The end of a replay: the sequence number -1 as 8 big-endian bytes.
const END_OF_REPLAY: [u8; 8] = [0xff; 8];

/// How long one replay message may wait for its client.
const REPLAY_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The medium vLLM names the primary KV cache.
const MEDIUM: &str = "GPU";

#[derive(Debug, Clone, PartialEq)]
pub struct KvEventsConfig {
    /// Where the PUB socket binds, e.g. `tcp://10.0.0.5:5557`.
    pub endpoint: String,
    /// Where the replay ROUTER socket binds (none: no replay).
    pub replay_endpoint: Option<String>,
    /// The pod part of the topic (`kv@<pod>@<model>`).
    pub pod: String,
}

/// One engine's index changes of one step.
#[derive(Debug)]
pub struct Batch {
    pub model: Arc<str>,
    pub block_size: usize,
    /// The engine (re)started with an empty cache: subscribers forget what they knew of it.
    pub cleared: bool,
    pub events: Vec<KvEvent>,
}

/// Where engines send their events.
#[derive(Debug, Clone)]
pub struct Sink {
    tx: flume::Sender<Batch>,
    /// Dropped since the publisher last looked (it skips as many sequence numbers).
    dropped: Arc<AtomicU64>,
    dropped_total: Arc<AtomicU64>,
}

/// One engine's end of the sink: its model and block size go with every batch it sends.
pub struct EngineEvents {
    sink: Sink,
    model: Arc<str>,
    block_size: usize,
}

impl EngineEvents {
    pub fn new(sink: Sink, model: &str, block_size: usize) -> Self {
        Self {
            sink,
            model: model.into(),
            block_size,
        }
    }

    /// Queue one step's changes (`cleared`: the engine starts empty).
    pub fn send(&self, cleared: bool, events: Vec<KvEvent>) {
        self.sink.send(Batch {
            model: self.model.clone(),
            block_size: self.block_size,
            cleared,
            events,
        });
    }
}

impl Sink {
    /// Queue a batch; never blocks the engine (a full queue drops it, and says so).
    pub fn send(&self, batch: Batch) {
        if let Err(flume::TrySendError::Full(_)) = self.tx.try_send(batch) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let n = self.dropped_total.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "KV-event publisher behind: batches dropped (routers' view of the cache is stale)"
                );
            }
        }
    }
}

/// The published batches kept for replay: (sequence number, payload).
type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// Bind the sockets and start publishing; events sent to the returned sink go out in order.
/// Call inside the Tokio runtime.
pub async fn start(cfg: &KvEventsConfig) -> Result<Sink> {
    let bad = |what: &str, e: zeromq::ZmqError| {
        HearthError::Config(format!("kv events: cannot bind {what}: {e}"))
    };
    let mut publisher = zeromq::PubSocket::new();
    publisher
        .bind(&any_host(&cfg.endpoint))
        .await
        .map_err(|e| bad(&cfg.endpoint, e))?;
    let buffer: Buffer = Arc::default();
    if let Some(replay) = &cfg.replay_endpoint {
        let mut router = zeromq::RouterSocket::new();
        router
            .bind(&any_host(replay))
            .await
            .map_err(|e| bad(replay, e))?;
        tokio::spawn(serve_replays(router, buffer.clone()));
    }
    let (tx, rx) = flume::bounded(QUEUED_BATCHES);
    let dropped = Arc::new(AtomicU64::new(0));
    tokio::spawn(publish(
        publisher,
        rx,
        buffer,
        cfg.pod.clone(),
        dropped.clone(),
    ));
    tracing::warn!(
        endpoint = %cfg.endpoint,
        replay = ?cfg.replay_endpoint,
        "publishing KV-cache events: they carry prompt token ids of every tenant"
    );
    Ok(Sink {
        tx,
        dropped,
        dropped_total: Arc::default(),
    })
}

async fn publish(
    mut socket: zeromq::PubSocket,
    rx: flume::Receiver<Batch>,
    buffer: Buffer,
    pod: String,
    dropped: Arc<AtomicU64>,
) {
    let mut seq: u64 = 0;
    while let Ok(batch) = rx.recv_async().await {
        // Batches an engine dropped leave a gap in the numbers, so subscribers see they missed
        // something.
        seq += dropped.swap(0, Ordering::Relaxed);
        let payload = Bytes::from(encode(&batch, now_secs()));
        let mut msg = ZmqMessage::from(format!("kv@{pod}@{}", batch.model));
        msg.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
        msg.push_back(payload.clone());
        // PUB drops for subscribers that cannot keep up; an error here is the socket's end.
        if let Err(e) = socket.send(msg).await {
            tracing::warn!(error = %e, "KV-event publish failed");
        }
        {
            let mut b = buffer.lock().unwrap_or_else(PoisonError::into_inner);
            if b.len() == REPLAY_BATCHES {
                b.pop_front();
            }
            b.push_back((seq, payload));
        }
        seq += 1;
    }
}

/// Answer each `[identity, "", start sequence]` with the buffered batches from there on, each as
/// `[identity, "", sequence, payload]`, then `[identity, "", -1, ""]`.
async fn serve_replays(mut socket: zeromq::RouterSocket, buffer: Buffer) {
    loop {
        let msg = match socket.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "KV-event replay socket closed");
                return;
            }
        };
        let frames = msg.into_vec();
        let (Some(id), Some(start)) = (frames.first(), frames.last()) else {
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
            continue;
        };
        let start = u64::from_be_bytes(start);
        let replies: Vec<(u64, Bytes)> = buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(s, _)| *s >= start)
            .cloned()
            .collect();
        let frame = |seq: &[u8], payload: Bytes| {
            let mut m = ZmqMessage::from(id.clone());
            m.push_back(Bytes::new());
            m.push_back(Bytes::copy_from_slice(seq));
            m.push_back(payload);
            m
        };
        // A client that stops reading must not hold the replay up for the others.
        let mut cut = false;
        for (seq, payload) in replies {
            let sent = tokio::time::timeout(
                REPLAY_SEND_TIMEOUT,
                socket.send(frame(&seq.to_be_bytes(), payload)),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                cut = true;
                break;
            }
        }
        if !cut {
            let end = socket.send(frame(&END_OF_REPLAY, Bytes::new()));
            let _ = tokio::time::timeout(REPLAY_SEND_TIMEOUT, end).await;
        }
    }
}

/// `tcp://*:PORT`, as vLLM's and llm-d's docs write it, is every interface.
fn any_host(endpoint: &str) -> String {
    endpoint.replacen("tcp://*:", "tcp://0.0.0.0:", 1)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The msgpack `EventBatch`: `[ts, [event, ...], data_parallel_rank]`, each event an array led by
/// its type's name, fields in vLLM's order. Block hashes are always 64-bit unsigned integers (a
/// decoder may refuse a hash that came out as a narrower integer).
pub fn encode(batch: &Batch, ts: f64) -> Vec<u8> {
    use rmp::encode as w;
    let mut out = Vec::new();
    let n = batch.events.len() + usize::from(batch.cleared);
    // Writing to a Vec cannot fail.
    let _ = w::write_array_len(&mut out, 3);
    let _ = w::write_f64(&mut out, ts);
    let _ = w::write_array_len(&mut out, n as u32);
    if batch.cleared {
        let _ = w::write_array_len(&mut out, 1);
        let _ = w::write_str(&mut out, "AllBlocksCleared");
    }
    for ev in &batch.events {
        match ev {
            KvEvent::Stored {
                hashes,
                parent,
                tokens,
                salt,
            } => {
                // BlockStored: block_hashes, parent_block_hash, token_ids, block_size, lora_id,
                // medium, lora_name, extra_keys.
                let _ = w::write_array_len(&mut out, 9);
                let _ = w::write_str(&mut out, "BlockStored");
                hashes_of(&mut out, hashes);
                match parent {
                    Some(p) => {
                        let _ = w::write_u64(&mut out, *p);
                    }
                    None => {
                        let _ = w::write_nil(&mut out);
                    }
                }
                let _ = w::write_array_len(&mut out, tokens.len() as u32);
                for &t in tokens {
                    let _ = w::write_uint(&mut out, u64::from(t));
                }
                let _ = w::write_uint(&mut out, batch.block_size as u64);
                let _ = w::write_nil(&mut out);
                let _ = w::write_str(&mut out, MEDIUM);
                let _ = w::write_nil(&mut out);
                // extra_keys, one entry per block: as vLLM does with a request's cache salt, the
                // tenant's salt rides on the block that starts the prompt.
                let _ = w::write_array_len(&mut out, hashes.len() as u32);
                for i in 0..hashes.len() {
                    if i == 0 && parent.is_none() {
                        let _ = w::write_array_len(&mut out, 1);
                        let _ = w::write_str(&mut out, &format!("{salt:016x}"));
                    } else {
                        let _ = w::write_nil(&mut out);
                    }
                }
            }
            KvEvent::Removed { hashes } => {
                let _ = w::write_array_len(&mut out, 3);
                let _ = w::write_str(&mut out, "BlockRemoved");
                hashes_of(&mut out, hashes);
                let _ = w::write_str(&mut out, MEDIUM);
            }
        }
    }
    let _ = w::write_uint(&mut out, 0);
    out
}

fn hashes_of(out: &mut Vec<u8>, hashes: &[u64]) {
    let _ = rmp::encode::write_array_len(out, hashes.len() as u32);
    for &h in hashes {
        let _ = rmp::encode::write_u64(out, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_vllms_array_layout() {
        let batch = Batch {
            model: "m".into(),
            block_size: 16,
            cleared: true,
            events: vec![
                KvEvent::Stored {
                    hashes: vec![7, 8],
                    parent: None,
                    tokens: (0..32).collect(),
                    salt: 0xabc,
                },
                KvEvent::Removed { hashes: vec![7] },
            ],
        };
        let bytes = encode(&batch, 1.5);
        let v: rmpv::Value = rmpv::decode::read_value(&mut bytes.as_slice()).unwrap();
        let top = v.as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].as_f64(), Some(1.5));
        assert_eq!(top[2].as_u64(), Some(0));
        let events = top[1].as_array().unwrap();
        assert_eq!(
            events[0].as_array().unwrap()[0].as_str(),
            Some("AllBlocksCleared")
        );
        let stored = events[1].as_array().unwrap();
        assert_eq!(stored[0].as_str(), Some("BlockStored"));
        assert_eq!(stored[1].as_array().unwrap()[1].as_u64(), Some(8));
        assert!(stored[2].is_nil());
        assert_eq!(stored[3].as_array().unwrap().len(), 32);
        assert_eq!(stored[4].as_u64(), Some(16));
        assert_eq!(stored[6].as_str(), Some("GPU"));
        let extra = stored[8].as_array().unwrap();
        assert_eq!(
            extra[0].as_array().unwrap()[0].as_str(),
            Some("0000000000000abc")
        );
        assert!(extra[1].is_nil());
        let removed = events[2].as_array().unwrap();
        assert_eq!(removed[0].as_str(), Some("BlockRemoved"));
        assert_eq!(removed[1].as_array().unwrap()[0].as_u64(), Some(7));
        // A small hash still goes out as a 64-bit integer (marker 0xcf).
        let at = bytes
            .windows(9)
            .position(|w| w[0] == 0xcf && w[1..] == 7u64.to_be_bytes());
        assert!(at.is_some());
    }
}
