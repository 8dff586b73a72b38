//! `hearth bench --suite cache`: the semantic response cache measured.
//!
//! 1. Hit decisions on labelled pairs (`--data`, default benches/cache_pairs.jsonl: an earlier
//!    question, a new one, and whether the earlier answer is right for the new one): for each
//!    threshold, the share of true paraphrases that hit (recall), the share of near misses that
//!    hit (false-hit rate), and precision, with the lexical guard and without it.
//! 2. Index lookups on a miss with `--entries` cached answers in one tenant under one context
//!    (the worst case: every entry is a candidate), and how often the sketch scan finds what an
//!    exhaustive scan finds.
//! 3. What a miss adds before the model starts: tokenizing and embedding the message (through
//!    the embedding batcher) plus the lookup.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::BenchArgs;
use crate::cache::index::dot;
use crate::cache::{guard, key, Answer, CacheConfig, Policy, Query, ResponseCache};
use crate::embedding::adapter::Adapter;
use crate::embedding::batcher::{BatchConfig, EmbedHandle};
use crate::embedding::Embedder;
use crate::error::Result;
use crate::server::openai::FinishReason;

#[derive(Debug, Clone, Deserialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
    /// `hit` (the same answer is right) or `miss`.
    pub label: String,
    /// paraphrase, entity, number, negation, other.
    pub kind: String,
    #[serde(default)]
    pub domain: String,
}

pub fn load_pairs(path: &Path) -> Result<Vec<Pair>> {
    super::route::load_jsonl(path)
}

/// Each pair's similarity and whether the guard lets it through.
pub fn score_pairs(e: &Embedder, pairs: &[Pair]) -> Result<Vec<(f32, bool)>> {
    let texts: Vec<&str> = pairs
        .iter()
        .flat_map(|p| [p.a.as_str(), p.b.as_str()])
        .collect();
    let mut vecs = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(32) {
        vecs.extend(e.embed(chunk)?);
    }
    Ok(pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                dot(&vecs[2 * i], &vecs[2 * i + 1]),
                guard::refuses(&p.a, &p.b).is_none(),
            )
        })
        .collect())
}

/// (recall, false-hit rate, precision) at `t`.
pub fn rates(pairs: &[Pair], scores: &[(f32, bool)], t: f32, guarded: bool) -> (f64, f64, f64) {
    let (mut tp, mut pos, mut fp, mut neg) = (0usize, 0usize, 0usize, 0usize);
    for (p, &(sim, pass)) in pairs.iter().zip(scores) {
        let hit = sim >= t && (pass || !guarded);
        if p.label == "hit" {
            pos += 1;
            tp += usize::from(hit);
        } else {
            neg += 1;
            fp += usize::from(hit);
        }
    }
    (
        tp as f64 / pos.max(1) as f64,
        fp as f64 / neg.max(1) as f64,
        if tp + fp == 0 {
            1.0
        } else {
            tp as f64 / (tp + fp) as f64
        },
    )
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn pairs_report(e: &Embedder, path: &Path, t: f32, json: Option<&Path>) -> Result<()> {
    let pairs = load_pairs(path)?;
    let scores = score_pairs(e, &pairs)?;
    if let Some(out) = json {
        let lines: Vec<String> = pairs
            .iter()
            .zip(&scores)
            .map(|(p, &(sim, _))| {
                let refusals = guard::all_refusals(&p.a, &p.b);
                serde_json::json!({
                    "a": p.a, "b": p.b, "label": p.label, "kind": p.kind,
                    "similarity": sim, "refused": refusals.first(), "refusals": refusals,
                })
                .to_string()
            })
            .collect();
        std::fs::write(out, lines.join("\n") + "\n")?;
    }
    let hits = pairs.iter().filter(|p| p.label == "hit").count();
    println!(
        "## Hit decisions: {} pairs ({hits} paraphrases that must hit, {} near misses that must not), {}\n",
        pairs.len(),
        pairs.len() - hits,
        path.display()
    );
    println!("| threshold | recall (guard) | false hits (guard) | precision (guard) | recall (similarity only) | false hits (similarity only) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for i in 0..=30 {
        let t = 0.70 + 0.01 * i as f32;
        let (r, f, p) = rates(&pairs, &scores, t, true);
        let (r0, f0, _) = rates(&pairs, &scores, t, false);
        println!(
            "| {t:.2} | {} | {} | {} | {} | {} |",
            pct(r),
            pct(f),
            pct(p),
            pct(r0),
            pct(f0)
        );
    }
    println!("\nAt the threshold {t:.2}, by kind (hits / pairs):");
    let mut kinds: Vec<&str> = pairs.iter().map(|p| p.kind.as_str()).collect();
    kinds.sort();
    kinds.dedup();
    for k in kinds {
        let (mut n, mut hit, mut hit0) = (0, 0, 0);
        for (p, &(sim, pass)) in pairs.iter().zip(&scores) {
            if p.kind == k {
                n += 1;
                hit += usize::from(sim >= t && pass);
                hit0 += usize::from(sim >= t);
            }
        }
        println!("- {k}: {hit}/{n} with the guard, {hit0}/{n} on similarity alone");
    }
    println!("\nParaphrases at {t:.2} or above that the guard refuses (why, similarity, pair):");
    for (p, &(sim, _)) in pairs.iter().zip(&scores) {
        if p.label == "hit" && sim >= t {
            if let Some(why) = guard::refuses(&p.a, &p.b) {
                println!("- {why} {sim:.3} {:?} / {:?}", p.a, p.b);
            }
        }
    }
    println!("\nFalse hits at {t:.2} (similarity, earlier question / new question):");
    for (p, &(sim, pass)) in pairs.iter().zip(&scores) {
        if p.label != "hit" && sim >= t && pass {
            println!("- {sim:.3} [{}] {:?} / {:?}", p.kind, p.a, p.b);
        }
    }
    Ok(())
}

fn answer() -> Answer {
    Answer {
        text: "A cached answer of ordinary length, a sentence or two long.".into(),
        logprobs: Vec::new(),
        reason: FinishReason::Stop,
        prompt_tokens: 40,
        completion_tokens: 20,
        cached_tokens: 0,
        device_ms: 100.0,
        route: None,
    }
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// A unit vector: `base` plus Gaussian-ish noise of `spread`, from a seed.
fn jitter(base: &[f32], seed: u64, spread: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v: Vec<f32> = base
        .iter()
        .map(|x| {
            let mut g = 0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                g += (s % 10_001) as f32 / 10_000.0 - 0.5;
            }
            x + spread * g / (base.len() as f32).sqrt()
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn index_report(e: Embedder, entries: usize) -> Result<()> {
    // Real message vectors as cluster centres, entries scattered around them (questions of one
    // application sit in a few dense regions of the space, not uniformly).
    let seeds = [
        "How do I reset my VPN password?",
        "What is the refund policy for damaged items?",
        "How many vacation days do new employees get?",
        "Which database does the billing service use?",
        "What is the capital of France?",
        "How do I submit an expense report for travel?",
        "Where can I find the onboarding guide?",
        "Why was my invoice charged twice this month?",
    ];
    let centres = e.embed(&seeds)?;
    let cache = ResponseCache::new(usize::MAX);
    let policy = Policy {
        max_bytes: usize::MAX,
        ..CacheConfig {
            exact: true,
            semantic: true,
            ..Default::default()
        }
        .policy(None, None)
    };
    let tenant: Arc<str> = "bench".into();
    let context = [7u8; 32];
    let t0 = Instant::now();
    let mut stored = Vec::with_capacity(entries);
    for i in 0..entries {
        let v = jitter(&centres[i % centres.len()], i as u64, 1.2);
        let mut exact = [0u8; 32];
        exact[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let keys = key::Keys {
            exact,
            semantic: context,
            text: None,
        };
        let q = Query {
            text: format!("question {i}"),
            vector: v.clone(),
        };
        cache.put(&tenant, &tenant, &keys, Some(q), answer(), &policy);
        if i % 97 == 0 {
            stored.push((i, v));
        }
    }
    let fill = t0.elapsed();
    let stats = cache.stats();
    let miss_keys = key::Keys {
        exact: [0xff; 32],
        semantic: context,
        text: None,
    };
    // Misses: new directions near the same centres, below the threshold to everything.
    let mut times = Vec::new();
    let mut false_hits = 0;
    for j in 0..1000u64 {
        let q = Query {
            text: "a question not asked before".into(),
            vector: jitter(&centres[j as usize % centres.len()], 1 << 40 | j, 1.2),
        };
        let t = Instant::now();
        let hit = cache.get(&tenant, &miss_keys, Some(&q), &policy, 0.97);
        times.push(t.elapsed());
        false_hits += usize::from(hit.is_some());
    }
    times.sort();
    // Hits: a stored vector moved slightly; the sketch scan must return that entry (or one as
    // similar).
    let (mut found, mut asked) = (0, 0);
    let mut hit_times = Vec::new();
    for (i, v) in stored.iter().take(500) {
        let q = Query {
            text: format!("question {i}"),
            vector: jitter(v, 1 << 50 | *i as u64, 0.3),
        };
        // A key of its own: a hit remembers its wording's key as an alias, which would answer
        // the next query without a search.
        let mut exact = [0xfe; 32];
        exact[..8].copy_from_slice(&(*i as u64).to_le_bytes());
        let keys = key::Keys {
            exact,
            semantic: context,
            text: None,
        };
        let t = Instant::now();
        let hit = cache.get(&tenant, &keys, Some(&q), &policy, 0.9);
        hit_times.push(t.elapsed());
        asked += 1;
        found += usize::from(hit.is_some_and(|h| h.similarity >= dot(v, &q.vector) - 1e-6));
    }
    hit_times.sort();
    println!(
        "\n## Index: {entries} entries in one tenant and one context ({:.0} MiB held, filled in {:.1} s)\n",
        stats.bytes as f64 / (1 << 20) as f64,
        fill.as_secs_f64()
    );
    println!("| lookup | p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| miss (1000 queries) | {:.3} | {:.3} | {:.3} |",
        quantile(&times, 0.5),
        quantile(&times, 0.99),
        quantile(&times, 1.0)
    );
    println!(
        "| hit (500 queries) | {:.3} | {:.3} | {:.3} |",
        quantile(&hit_times, 0.5),
        quantile(&hit_times, 0.99),
        quantile(&hit_times, 1.0)
    );
    println!(
        "\nSketch scan against exhaustive: {found}/{asked} hits found the most similar entry; {false_hits}/1000 misses hit at 0.97."
    );
    Ok(())
}

fn miss_overhead_report(embedder: Embedder) -> Result<()> {
    let h = EmbedHandle::start(
        "bench",
        embedder,
        BatchConfig {
            max_batch_tokens: 4096,
            max_waiting: 16,
        },
    )?;
    let cache = ResponseCache::new(1 << 30);
    let policy = CacheConfig {
        exact: true,
        semantic: true,
        ..Default::default()
    }
    .policy(None, None);
    let questions = [
        "How do I reset my VPN password?",
        "What is the refund policy for items that arrived damaged?",
        "According to the onboarding guide, who approves access to the production database?",
        "Can I carry over unused vacation days into next year?",
    ];
    let mut times = Vec::new();
    for i in 0..200 {
        let text = questions[i % questions.len()];
        let t = Instant::now();
        let ids = h.embedder().tokenize_whole(text)?;
        let done = h.embed_blocking(vec![ids], "bench")?;
        let q = Query {
            text: text.into(),
            vector: done.vectors.into_iter().next().unwrap_or_default(),
        };
        let keys = key::Keys {
            exact: [i as u8; 32],
            semantic: [1; 32],
            text: None,
        };
        let _ = cache.get("bench", &keys, Some(&q), &policy, 0.99);
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "\n## What a miss adds before the model starts (tokenize + embed the message through the batcher + look up), 200 messages of 8-16 tokens, nothing else running\n"
    );
    println!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        quantile(&times, 0.5),
        quantile(&times, 0.99),
        quantile(&times, 1.0)
    );
    Ok(())
}

pub fn suite(args: &BenchArgs) -> Result<()> {
    let path = args.model_path()?;
    let device = crate::device::select(args.device.as_deref())?;
    let adapter = args.adapter.as_deref().map(Adapter::parse);
    let load = || Embedder::load_adapted(path, adapter.as_ref(), &device);
    let data = args.data_or("benches/cache_pairs.jsonl");
    let e = load()?;
    let t = args
        .threshold
        .unwrap_or_else(|| crate::cache::default_threshold(&e));
    pairs_report(&e, &data, t, args.json.as_deref())?;
    if args.entries == 0 {
        return Ok(());
    }
    index_report(load()?, args.entries)?;
    miss_overhead_report(load()?)?;
    Ok(())
}
