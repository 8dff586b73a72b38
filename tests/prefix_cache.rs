//! Prefix reuse and memory pressure on a real model (SmolLM2): shared prefixes are computed once,
//! to the token (whole cached blocks, then the leading slots of the cached block that shares the
//! most), preemption under a tiny pool keeps every output exact, and tenants never share blocks.
mod common;

use hearth::engine::{EngineConfig, EngineHandle, Request, SamplingParams, SchedulerConfig};
use proptest::prelude::*;

fn words(seed: u64, n: usize) -> String {
    const W: [&str; 16] = [
        "policy", "the", "tenant", "shall", "report", "each", "quarter", "and", "data", "never",
        "leaves", "site", "audit", "of", "records", "annual",
    ];
    let mut x = seed.wrapping_add(0x9e3779b97f4a7c15);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            W[(x % 16) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn ids(e: &EngineHandle, seed: u64, len: usize) -> Vec<u32> {
    let t = e.tokenizer.encode(&words(seed, len)).unwrap();
    t[..len].to_vec()
}

/// SmolLM2 with prefix caching off: what every output must equal.
fn uncached() -> EngineHandle {
    common::engine(
        &common::smollm2(),
        EngineConfig {
            prefix_caching: false,
            ..Default::default()
        },
    )
}

fn run(e: &EngineHandle, prompt: &[u32], tenant: Option<&str>, n: usize) -> (Vec<u32>, usize, u64) {
    let before = e.stats().prefill_tokens;
    let (toks, _, usage) = e
        .generate(Request {
            prompt: prompt.to_vec(),
            params: SamplingParams {
                max_tokens: Some(n),
                ignore_eos: true,
                ..SamplingParams::greedy()
            },
            tenant: tenant.map(String::from),
            weight: 1,
            constraint: None,
        })
        .unwrap();
    let computed = e.stats().prefill_tokens - before;
    (
        toks.iter().map(|s| s.token).collect(),
        usage.cached_tokens,
        computed,
    )
}

#[test]
fn shared_prefix_is_computed_once_and_output_is_unchanged() {
    let on = common::engine(&common::smollm2(), EngineConfig::default());
    let off = uncached();
    // 400 ends on a block boundary (25 blocks of 16); 410 ends inside block 26, whose first 10
    // slots are copied from the first request's block 26.
    for prefix_len in [400usize, 410] {
        let prefix = ids(&on, prefix_len as u64, prefix_len);
        let mut first = prefix.clone();
        first.extend(ids(&on, 1000 + prefix_len as u64, 20));
        let mut second = prefix.clone();
        second.extend(ids(&on, 2000 + prefix_len as u64, 30));
        // The suffixes' words may agree for a token or two; every shared token is reused.
        let want_cached = first
            .iter()
            .zip(&second)
            .take_while(|(a, b)| a == b)
            .count();
        assert!(want_cached >= prefix_len);

        let (_, cached_first, computed_first) = run(&on, &first, None, 4);
        assert_eq!(cached_first, 0);
        assert_eq!(computed_first as usize, first.len());

        let (out, cached, computed) = run(&on, &second, None, 16);
        assert_eq!(cached, want_cached, "prefix {prefix_len}");
        assert_eq!(
            computed as usize,
            second.len() - want_cached,
            "only the suffix is prefilled"
        );
        let (reference, cached_off, computed_off) = run(&off, &second, None, 16);
        assert_eq!((cached_off, computed_off as usize), (0, second.len()));
        assert_eq!(
            out, reference,
            "prefix {prefix_len}: output differs from caching off"
        );
    }
    let s = on.stats();
    assert!(s.prefix_hit_tokens >= 800);
    assert!(s.prefix_query_tokens > s.prefix_hit_tokens);
    common::wait_idle(&on);
    assert!(
        on.cached_blocks() > 0,
        "finished requests' blocks stay cached"
    );
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let e = common::engine(&common::smollm2(), EngineConfig::default());
    let prompt = ids(&e, 5, 64); // exactly 4 blocks
    let (a, _, _) = run(&e, &prompt, None, 8);
    let (b, cached, computed) = run(&e, &prompt, None, 8);
    assert_eq!(a, b);
    assert_eq!(cached, 63, "the last token is computed so its logits exist");
    assert_eq!(computed, 1);
}

/// A shared instruction that ends inside a block, then questions of one template: each prompt
/// reuses every token it shares with an earlier one, not only whole blocks, and every output is
/// what the prompt gives with caching off.
#[test]
fn prompts_reuse_a_shared_prefix_to_the_token_and_outputs_are_unchanged() {
    let on = common::engine(&common::smollm2(), EngineConfig::default());
    let off = uncached();
    let enc = |s: &str| on.tokenizer.encode(s).unwrap();
    let instruction = "You are the internal assistant of a company. Answer with a short, correct \
                       completion of the text below, nothing else.\n\n";
    let prompts: Vec<Vec<u32>> = ["Poland", "South Korea", "Peru", "Kenya"]
        .iter()
        .map(|c| {
            enc(&format!(
                "{instruction}Q: What is the capital of {c}?\nA: The capital of {c} is"
            ))
        })
        .collect();
    let shared = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    assert!(
        shared(&prompts[0], &prompts[1]) % 16 != 0,
        "the shared part must end inside a block for this test to mean anything"
    );
    for (i, p) in prompts.iter().enumerate() {
        let (out, cached, computed) = run(&on, p, None, 8);
        let want = prompts[..i]
            .iter()
            .map(|q| shared(q, p))
            .max()
            .unwrap_or(0)
            .min(p.len() - 1);
        assert_eq!(cached, want, "prompt {i}");
        assert_eq!(computed as usize, p.len() - want, "prompt {i}");
        assert_eq!(out, run(&off, p, None, 8).0, "prompt {i}: output differs");
    }
}

#[test]
fn different_tenants_never_share_blocks() {
    let e = common::engine(&common::smollm2(), EngineConfig::default());
    let prompt = ids(&e, 7, 200);
    let (out_a, cached_a, _) = run(&e, &prompt, Some("tenant-a"), 8);
    assert_eq!(cached_a, 0);
    let (out_b, cached_b, computed_b) = run(&e, &prompt, Some("tenant-b"), 8);
    assert_eq!(cached_b, 0, "another tenant's prefix must not hit");
    assert_eq!(computed_b, 200);
    let (_, cached_none, _) = run(&e, &prompt, None, 8);
    assert_eq!(cached_none, 0, "no tenant is a namespace of its own");
    let (out_a2, cached_a2, _) = run(&e, &prompt, Some("tenant-a"), 8);
    assert_eq!(cached_a2, 199, "the same tenant hits its own prefix");
    assert_eq!(out_a, out_b);
    assert_eq!(out_a, out_a2);
}

/// A burst of requests behind one fresh prefix: the prefix is computed once, not once for every
/// request admitted while it was being computed, and every output is what the prompt gives alone.
#[test]
fn a_burst_behind_a_fresh_prefix_computes_it_once() {
    let e = common::engine(&common::smollm2(), EngineConfig::default());
    let (prefix_len, suffix_len, n) = (320usize, 40usize, 8u64);
    let prefix = ids(&e, 7, prefix_len);
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| [prefix.clone(), ids(&e, 100 + i, suffix_len)].concat())
        .collect();
    let before = e.stats().prefill_tokens;
    let outs: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let (e, p) = (e.clone(), p.clone());
            std::thread::spawn(move || run(&e, &p, None, 4).0)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let computed = e.stats().prefill_tokens - before;
    let ideal = prefix_len + n as usize * suffix_len;
    assert!(
        computed as f64 <= 1.1 * ideal as f64,
        "computed {computed} prompt tokens, ideal {ideal}"
    );
    let off = uncached();
    for (p, out) in prompts.iter().zip(&outs) {
        assert_eq!(&run(&off, p, None, 4).0, out);
    }
}

#[derive(Debug, Clone)]
struct Job {
    prefix: usize,
    suffix: usize,
    max_tokens: usize,
}

fn job() -> impl Strategy<Value = Job> {
    (0usize..3, 1usize..60, 1usize..24).prop_map(|(prefix, suffix, max_tokens)| Job {
        prefix,
        suffix,
        max_tokens,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// A pool of 14 blocks (224 tokens) for up to 8 concurrent sequences of up to ~160 tokens:
    /// sequences are preempted often. Every request still finishes with the greedy output it has
    /// alone, and at the end every block is free or cached.
    #[test]
    fn preemption_under_a_tiny_pool_keeps_outputs_exact(jobs in prop::collection::vec(job(), 2..9)) {
        let solo = uncached();
        let cfg = EngineConfig {
            num_blocks: Some(14),
            scheduler: SchedulerConfig { max_batch_tokens: 96, max_seqs: 8, ..Default::default() },
            ..Default::default()
        };
        let e = common::engine(&common::smollm2(), cfg);
        // Three shared prefixes (0, 40 and 70 tokens) so cached blocks are shared and evicted too.
        let prefixes = [Vec::new(), ids(&e, 1, 40), ids(&e, 2, 70)];
        let prompts: Vec<Vec<u32>> = jobs.iter().enumerate().map(|(i, j)| {
            let mut p = prefixes[j.prefix].clone();
            p.extend(ids(&e, 100 + i as u64, j.suffix));
            p
        }).collect();
        let expected: Vec<Vec<u32>> = prompts.iter().zip(&jobs)
            .map(|(p, j)| common::greedy_n(&solo, p, j.max_tokens)).collect();
        let rxs: Vec<_> = prompts.iter().zip(&jobs).map(|(p, j)| {
            e.submit(Request::new(p.clone(), SamplingParams {
                max_tokens: Some(j.max_tokens), ignore_eos: true, ..SamplingParams::greedy()
            })).unwrap()
        }).collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let got: Vec<u32> = rx.iter().filter_map(|ev| match ev {
                hearth::engine::Event::Token(s) => Some(s.token),
                _ => None,
            }).collect();
            prop_assert_eq!(&got, &expected[i], "request {}", i);
        }
        common::wait_idle(&e);
        prop_assert_eq!(e.free_blocks(), e.total_blocks());
    }
}

#[test]
fn a_tiny_pool_does_preempt() {
    let cfg = EngineConfig {
        num_blocks: Some(10),
        scheduler: SchedulerConfig {
            max_batch_tokens: 64,
            max_seqs: 8,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = common::engine(&common::smollm2(), cfg);
    let rxs: Vec<_> = (0..6)
        .map(|i| {
            e.submit(Request::new(
                ids(&e, 50 + i, 30),
                SamplingParams {
                    max_tokens: Some(20),
                    ignore_eos: true,
                    ..SamplingParams::greedy()
                },
            ))
            .unwrap()
        })
        .collect();
    for rx in rxs {
        let n = rx
            .iter()
            .filter(|ev| matches!(ev, hearth::engine::Event::Token(_)))
            .count();
        assert_eq!(n, 20);
    }
    assert!(
        e.stats().preemptions > 0,
        "6 x 50 tokens cannot fit 160 slots"
    );
    common::wait_idle(&e);
}
