//! KV-cache events as a prefix-aware router receives them: a subscriber written the way llm-d's
//! vLLM adapter decodes (pyzmq + msgpack, tests/python/kv_events_client.py) gets BlockStored
//! events whose token ids rebuild the prompt's full blocks, under a different salt per tenant,
//! BlockRemoved when blocks are evicted, and the same batches again from the replay socket.
mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent, TestServer};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

const KEY_A: &str = "kv-key-a";
const KEY_B: &str = "kv-key-b";

fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/python");
    assert!(
        p.exists(),
        "run scripts/test.sh, which installs pyzmq and msgpack"
    );
    p
}

fn client() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/kv_events_client.py")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Subscriber(Child, PathBuf);

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

impl Subscriber {
    /// The messages written so far: complete lines only (the subscriber may be writing one).
    fn messages(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.1).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Wait (up to a minute) until `done` holds for the messages received.
    fn until(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let m = self.messages();
            if done(&m) {
                return m;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "never saw {what}: {m:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn post(base: &str, path: &str, key: &str, body: &Value) -> Value {
    let mut r = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("authorization", &format!("Bearer {key}"))
        .send(body.to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
}

/// Every event of the messages, in order.
fn events(msgs: &[Value]) -> Vec<Value> {
    msgs.iter()
        .flat_map(|m| m["events"].as_array().unwrap().clone())
        .collect()
}

/// The stored chain that starts a prompt with `prefix`: (its salt, hashes, token ids), following
/// parent links across events.
fn chain_of(evs: &[Value], prefix: &[Value]) -> Vec<(String, Vec<u64>, Vec<Value>)> {
    let stored: Vec<&Value> = evs.iter().filter(|e| e["type"] == "BlockStored").collect();
    let mut out = Vec::new();
    for root in stored.iter().filter(|e| e["parent_block_hash"].is_null()) {
        let toks = root["token_ids"].as_array().unwrap();
        if toks.len() < prefix.len().min(16) || toks[..16] != prefix[..16] {
            continue;
        }
        let salt = root["extra_keys"][0][0].as_str().unwrap().to_string();
        let mut hashes: Vec<u64> = Vec::new();
        let mut tokens: Vec<Value> = Vec::new();
        let mut at = Some(*root);
        while let Some(e) = at {
            hashes.extend(
                e["block_hashes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h.as_u64().unwrap()),
            );
            tokens.extend(e["token_ids"].as_array().unwrap().iter().cloned());
            let last = *hashes.last().unwrap();
            at = stored
                .iter()
                .find(|n| n["parent_block_hash"].as_u64() == Some(last))
                .copied();
        }
        out.push((salt, hashes, tokens));
    }
    out
}

#[test]
fn a_subscriber_sees_stored_removed_and_replayed_blocks() {
    let (events_port, replay_port) = (free_port(), free_port());
    let s = TestServer::start(hearth::config::Config {
        models: vec![hearth::config::ModelEntry::new(
            "kv-smol",
            common::smollm2(),
        )],
        tenants: vec![
            TenantConfig::new("kv-a", &[KEY_A]),
            TenantConfig::new("kv-b", &[KEY_B]),
        ],
        // Room for a few prompts only: more evict the oldest cached blocks.
        kv_cache_mib: 16,
        // Every interface, written as vLLM's and llm-d's docs write it.
        kv_events_endpoint: Some(format!("tcp://*:{events_port}")),
        kv_events_replay_endpoint: Some(format!("tcp://127.0.0.1:{replay_port}")),
        kv_events_pod: Some("pod-7".into()),
        ..Default::default()
    });
    let out = std::env::temp_dir().join(format!("hearth-kv-events-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let mut child = Command::new(python())
        .arg(client())
        .args(["subscribe", &format!("tcp://127.0.0.1:{events_port}")])
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let sub = Subscriber(child, out);
    // A SUB socket receives only once its subscription reached the publisher.
    std::thread::sleep(Duration::from_millis(500));

    let prompt = "The committee met on Tuesday to review the quarterly figures of the northern \
                  depot, the delays on the coastal line and the budget for the new warehouse. "
        .repeat(3);
    let body = json!({"model": "kv-smol", "prompt": prompt, "max_tokens": 1});
    let ids = post(&s.base, "/v1/completions/render", KEY_A, &body)["token_ids"]
        .as_array()
        .unwrap()
        .clone();
    assert!(ids.len() > 64, "{}", ids.len());
    post(&s.base, "/v1/completions", KEY_A, &body);
    post(&s.base, "/v1/completions", KEY_B, &body);
    let full = ids.len() / 16 * 16;
    let msgs = sub.until("both tenants' blocks", |m| {
        chain_of(&events(m), &ids).len() == 2
    });
    let chains = chain_of(&events(&msgs), &ids);
    for (_, hashes, tokens) in &chains {
        // The token ids rebuild the prompt's full blocks (and at most one more, with output).
        assert!(tokens.len() >= full && tokens.len() % 16 == 0);
        assert_eq!(tokens[..full], ids[..full]);
        assert_eq!(hashes.len(), tokens.len() / 16);
    }
    assert_ne!(chains[0].0, chains[1].0, "two tenants, two salts");
    assert!(chains[0].1.iter().all(|h| !chains[1].1.contains(h)));
    for m in &msgs {
        assert_eq!(m["topic"], "kv@pod-7@kv-smol");
        assert_eq!(m["dp_rank"], 0);
        for e in m["events"].as_array().unwrap() {
            if e["type"] == "BlockStored" {
                assert_eq!(e["block_size"], 16);
                assert_eq!(e["medium"], "GPU");
                assert!(e["lora_id"].is_null());
            }
        }
    }

    // Other prompts need the blocks: tenant A's are evicted, and the subscriber hears it.
    let first_a = chains[0].1.clone();
    for i in 0..12 {
        let other =
            format!("Story {i}: ") + &"a quiet town by the sea, where nothing happened. ".repeat(8);
        post(
            &s.base,
            "/v1/completions",
            KEY_A,
            &json!({"model": "kv-smol", "prompt": other, "max_tokens": 1}),
        );
        let removed: Vec<u64> = events(&sub.messages())
            .iter()
            .filter(|e| e["type"] == "BlockRemoved")
            .flat_map(|e| e["block_hashes"].as_array().unwrap().clone())
            .map(|h| h.as_u64().unwrap())
            .collect();
        if first_a.iter().any(|h| removed.contains(h)) {
            break;
        }
        assert!(i < 11, "tenant A's blocks were never reported evicted");
    }

    // Sequence numbers run on without gaps; the replay from 0 has every batch, the first the
    // engine's start (AllBlocksCleared), each as the subscriber got it.
    let live = sub.messages();
    let seqs: Vec<u64> = live.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let replay = Command::new(python())
        .arg(client())
        .args(["replay", &format!("tcp://127.0.0.1:{replay_port}"), "0"])
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let replayed: Vec<Value> = String::from_utf8_lossy(&replay.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(replayed[0]["seq"], 0);
    assert_eq!(replayed[0]["events"][0]["type"], "AllBlocksCleared");
    for m in &live {
        let r = replayed
            .iter()
            .find(|r| r["seq"] == m["seq"])
            .unwrap_or_else(|| panic!("seq {} not replayed", m["seq"]));
        assert_eq!(r["events"], m["events"]);
    }
    // From a later number: only what follows it.
    let from = seqs[seqs.len() / 2];
    let later = Command::new(python())
        .arg(client())
        .args([
            "replay",
            &format!("tcp://127.0.0.1:{replay_port}"),
            &from.to_string(),
        ])
        .output()
        .unwrap();
    let later: Vec<u64> = String::from_utf8_lossy(&later.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(later.first(), Some(&from));
    assert!(later.iter().all(|&s| s >= from));
}
