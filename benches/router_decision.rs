//! The router's own work per cascade decision, without the models (cargo bench --bench
//! router_decision): the doubt statistics over the probe tokens of one choice, the thresholds, and
//! the load check's estimates for two models, and the decision record a response carries. The in-server histogram
//! (`hearth_router_decision_seconds`) measures the same on the serving thread, where a busy
//! machine's preemption adds to it.
use std::time::Instant;

use hearth::engine::Load;
use hearth::router::load::{estimate, keep};
use hearth::router::{Decision, Policy, Probe, Signals, Thresholds};

fn main() {
    let probes: Vec<Probe> = (0..8)
        .map(|i| Probe {
            logprob: -0.05 * i as f32,
            margin: 2.0 - 0.2 * i as f32,
        })
        .collect();
    let thresholds = Thresholds::default();
    let busy = Load {
        pending_prompt_tokens: 3_000,
        running: 12,
        free_blocks: 400,
        block_size: 16,
        max_batch_tokens: 512,
        step_cost: Some((4e6, 2.5e5)),
    };
    let target = std::time::Duration::from_millis(500);
    let n = 200_000;
    let mut samples = Vec::with_capacity(n);
    let mut kept = 0usize;
    for i in 0..n {
        let t = Instant::now();
        let signals = Signals::of(&probes[..1 + i % 8]);
        let reason = signals
            .and_then(|s| s.doubt(&thresholds))
            .unwrap_or("confident");
        // The load check's work for two models (the engines' snapshots are read under a lock).
        let load = ["smollm2-135m-instruct", "gemma-3-270m"]
            .iter()
            .map(|m| estimate(m, &busy, 40 + i % 300, target))
            .collect::<Vec<_>>();
        kept += keep(&load).len();
        let d = Decision {
            group: "auto".into(),
            policy: Policy::Cascade,
            model: "smollm2-135m-instruct".into(),
            tried: vec!["smollm2-135m-instruct".into()],
            escalated: false,
            escalated_at_token: None,
            reason: reason.into(),
            signals,
            thresholds,
            load,
        };
        kept += usize::from(d.summary().len() > 4);
        samples.push(t.elapsed().as_nanos() as f64 / 1e3);
    }
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    println!(
        "decision work over 1-8 probe tokens ({n} runs, {kept} summaries): p50 {:.2} us, p99 {:.2} us, max {:.1} us",
        q(0.5),
        q(0.99),
        samples[samples.len() - 1]
    );
}
