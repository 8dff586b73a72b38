//! Continuous batching on a real model: batch invariance under chunked prefill, and block accounting
//! under random arrivals, lengths and aborts.
mod common;

use std::time::Duration;

use hearth::engine::{EngineConfig, Event, FinishReason, Request, SamplingParams, SchedulerConfig};
use proptest::prelude::*;

/// Deterministic filler text of roughly `words` words.
fn text(seed: u64, words: usize) -> String {
    const W: [&str; 24] = [
        "river", "stone", "the", "quietly", "engine", "of", "market", "blue", "seven", "and",
        "history", "Paris", "runs", "under", "a", "lamp", "42", "garden", "while", "code",
        "winter", "is", "bright", "numbers",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..words)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            W[(x >> 33) as usize % W.len()]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prompt ids of exactly `len` tokens.
fn prompt(e: &hearth::engine::EngineHandle, seed: u64, len: usize) -> Vec<u32> {
    let ids = e.tokenizer.encode(&text(seed, len)).unwrap();
    assert!(ids.len() >= len, "filler text too short");
    ids[..len].to_vec()
}

#[test]
fn sixteen_prompts_batched_with_chunked_prefill_match_each_alone() {
    let lens = [
        5, 9, 23, 48, 77, 120, 160, 211, 256, 300, 347, 400, 451, 500, 555, 600,
    ];
    // A 256-token step budget forces every prompt over 256 tokens through chunked prefill, sharing
    // steps with the others' decodes.
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 256,
            max_seqs: 64,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = common::engine(&common::smollm2(), cfg);
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| prompt(&e, i as u64, l))
        .collect();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| common::greedy_n(&e, p, 12))
        .collect();
    let params = SamplingParams {
        max_tokens: Some(12),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(Request::new(p.clone(), params.clone())).unwrap())
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let toks: Vec<u32> = rx
            .iter()
            .filter_map(|ev| match ev {
                Event::Token(s) => Some(s.token),
                _ => None,
            })
            .collect();
        assert_eq!(toks, alone[i], "prompt {i} ({} tokens)", lens[i]);
    }
    assert!(e.stats().steps > 0, "the engine ran steps");
    common::wait_idle(&e);
}

#[derive(Debug, Clone)]
struct Arrival {
    prompt_len: usize,
    max_tokens: usize,
    /// Drop the reply channel after this many tokens (an aborted client).
    abort_after: Option<usize>,
    delay_ms: u64,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        1usize..120,
        1usize..24,
        proptest::option::of(0usize..8),
        0u64..30,
    )
        .prop_map(|(prompt_len, max_tokens, abort_after, delay_ms)| Arrival {
            prompt_len,
            max_tokens,
            abort_after,
            delay_ms,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Whatever arrives, finishes or is dropped, every block is free again afterwards, and every
    /// request that was not dropped finishes with a reason and the tokens it was allowed.
    #[test]
    fn every_block_is_free_after_any_mix_of_finished_and_aborted(arrivals in prop::collection::vec(arrival(), 1..10)) {
        // A small pool (24 blocks of 16) so sequences compete for blocks and get preempted.
        let cfg = EngineConfig {
            num_blocks: Some(24),
            scheduler: SchedulerConfig { max_batch_tokens: 64, max_seqs: 8, ..Default::default() },
            ..Default::default()
        };
        let e = common::engine(&common::smollm2(), cfg);
        let mut handles = Vec::new();
        for (i, a) in arrivals.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(a.delay_ms));
            let rx = e.submit(Request {
                tenant: None,
                weight: 1,
                constraint: None,
                prompt: prompt(&e, i as u64, a.prompt_len),
                params: SamplingParams { max_tokens: Some(a.max_tokens), ignore_eos: true, ..SamplingParams::greedy() },
            }).unwrap();
            let a = a.clone();
            handles.push(std::thread::spawn(move || {
                let mut n = 0;
                for ev in rx.iter() {
                    if a.abort_after == Some(n) {
                        return None; // drops the receiver: the client went away
                    }
                    match ev {
                        Event::Admitted { .. } | Event::Prefilled { .. } => {}
                        Event::Token(_) => n += 1,
                        Event::Finished { reason, usage } => return Some((reason, n, usage.completion_tokens)),
                        Event::Error(err) => panic!("request failed: {err}"),
                    }
                }
                panic!("reply channel closed without a Finished event");
            }));
        }
        for (h, a) in handles.into_iter().zip(&arrivals) {
            if let Some((reason, n, completion)) = h.join().unwrap() {
                prop_assert_eq!(reason, FinishReason::Length);
                prop_assert_eq!(n, a.max_tokens);
                prop_assert_eq!(completion, a.max_tokens);
            }
        }
        common::wait_idle(&e);
        prop_assert_eq!(e.free_blocks(), e.total_blocks());
    }
}
