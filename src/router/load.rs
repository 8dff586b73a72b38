//! The load policy: skip a model whose queue would make a new request wait past the route's
//! time-to-first-token target. The engine knows what is ahead of a request (prompt tokens not yet
//! run, sequences decoding, free KV blocks) and how fast it has been running prompt work; the wait
//! follows from those without a model of the hardware.
use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::Load;

/// One model's predicted first-token wait, as the decision reports it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct LoadEstimate {
    pub model: String,
    /// Predicted time to the first token; None when the engine has run no prompt work yet (its
    /// rate is unknown, and an idle engine is taken to fit).
    pub ttft_ms: Option<f64>,
    /// Whether the free KV blocks hold the prompt once the queue ahead is admitted (when they do
    /// not, the request would wait for other requests to finish, which no rate predicts).
    pub kv_room: bool,
    /// Whether the model was kept: room in the KV cache and the wait within the target.
    pub fits: bool,
}

/// Predict the wait of a `prompt_tokens` prompt on an engine under `load`.
///
/// Every step runs at most `max_batch_tokens` tokens; each decoding sequence takes one of them,
/// prompt work the rest. The queued prompt tokens and this prompt need that many steps, each
/// costing the engine's measured fixed step time plus its time per token for every token it runs
/// (prompt chunks and the decoders' tokens alike).
pub fn estimate(model: &str, load: &Load, prompt_tokens: usize, target: Duration) -> LoadEstimate {
    let kv_room = prompt_tokens.div_ceil(load.block_size.max(1)) <= load.free_blocks;
    let ttft = load.step_cost.map(|(fixed, per_token)| {
        let for_prompts = load.max_batch_tokens.saturating_sub(load.running).max(1);
        let tokens = load.pending_prompt_tokens + prompt_tokens;
        let steps = tokens.div_ceil(for_prompts);
        let run = (tokens + steps * load.running) as f64;
        Duration::from_secs_f64((steps as f64 * fixed + run * per_token) * 1e-9)
    });
    LoadEstimate {
        model: model.into(),
        ttft_ms: ttft.map(|d| d.as_secs_f64() * 1e3),
        kv_room,
        fits: kv_room && ttft.is_none_or(|t| t <= target),
    }
}

/// The models to keep, in the group's order: those that fit; when none does, the one predicted to
/// answer first (a model with no KV room counts as slowest), so a request is never refused by the
/// router for load alone (admission control refuses what truly cannot queue).
pub fn keep(estimates: &[LoadEstimate]) -> Vec<usize> {
    let fitting: Vec<usize> = (0..estimates.len())
        .filter(|&i| estimates[i].fits)
        .collect();
    if !fitting.is_empty() {
        return fitting;
    }
    let wait = |e: &LoadEstimate| match (e.kv_room, e.ttft_ms) {
        (false, _) => f64::INFINITY,
        (true, t) => t.unwrap_or(0.0),
    };
    (0..estimates.len())
        .min_by(|&a, &b| wait(&estimates[a]).total_cmp(&wait(&estimates[b])))
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of 2 ms plus 1 ms a token.
    fn load(pending: usize, running: usize, free_blocks: usize, measured: bool) -> Load {
        Load {
            pending_prompt_tokens: pending,
            running,
            free_blocks,
            block_size: 16,
            max_batch_tokens: 512,
            step_cost: measured.then_some((2e6, 1e6)),
        }
    }

    const TARGET: Duration = Duration::from_millis(500);

    #[test]
    fn a_deep_queue_breaks_the_target_and_an_idle_engine_fits() {
        // 100 tokens alone: one step, 2 + 100 ms; behind 2,000 queued ones: 5 steps, 10 + 2,100 ms.
        let idle = estimate("m", &load(0, 0, 100, true), 100, TARGET);
        assert!(idle.fits);
        assert!((idle.ttft_ms.unwrap() - 102.0).abs() < 1e-6);
        let busy = estimate("m", &load(2_000, 0, 100, true), 100, TARGET);
        assert!(!busy.fits);
        assert!((busy.ttft_ms.unwrap() - 2_110.0).abs() < 1e-6);
    }

    #[test]
    fn decoders_slow_the_prefill_and_a_full_cache_does_not_fit() {
        // 312 decoders leave 200 tokens of each step: 300 prompt tokens take 2 steps of 512.
        let e = estimate("m", &load(200, 312, 100, true), 100, TARGET);
        assert!((e.ttft_ms.unwrap() - (4.0 + 300.0 + 624.0)).abs() < 1e-6);
        let full = estimate("m", &load(0, 0, 6, true), 100, TARGET);
        assert!(!full.kv_room && !full.fits);
        let unmeasured = estimate("m", &load(50_000, 0, 100, false), 100, TARGET);
        assert!(unmeasured.fits && unmeasured.ttft_ms.is_none());
    }

    #[test]
    fn step_cost_fits_a_fixed_part_and_a_per_token_part() {
        let mut c = crate::engine::StepCost::default();
        assert_eq!(c.fit(), None);
        for n in [1, 512, 8, 300, 1, 64] {
            c.add(n, 5e6 + 2e5 * n as f64);
        }
        let (fixed, per_token) = c.fit().unwrap();
        assert!((fixed - 5e6).abs() < 1.0 && (per_token - 2e5).abs() < 1e-3);
        let mut same = crate::engine::StepCost::default();
        same.add(10, 1e6);
        assert_eq!(same.fit(), Some((0.0, 1e5)));
    }

    #[test]
    fn keeps_the_fitting_models_or_else_the_soonest() {
        let e = |ttft: f64, kv_room: bool| LoadEstimate {
            model: String::new(),
            ttft_ms: Some(ttft),
            kv_room,
            fits: kv_room && ttft <= 500.0,
        };
        assert_eq!(keep(&[e(900.0, true), e(100.0, true)]), [1]);
        assert_eq!(keep(&[e(100.0, true), e(200.0, true)]), [0, 1]);
        assert_eq!(keep(&[e(900.0, true), e(700.0, true)]), [1]);
        assert_eq!(keep(&[e(900.0, true), e(1.0, false)]), [0]);
    }
}
