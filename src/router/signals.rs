//! The cascade's doubt signal: how sure the cheaper model was of its first tokens. Quantiles of the
//! low tail, not means: a mean over more tokens drifts with length, and one confident run of
//! boilerplate would hide the token where the model had to guess.
use serde::{Deserialize, Serialize};

/// What the engine reports about one probed token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    /// Log-probability of the token picked.
    pub logprob: f32,
    /// Log-probability gap between the best and the second-best token.
    pub margin: f32,
}

/// The statistics a decision reads, over every probed token of every choice.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Signals {
    pub tokens: usize,
    /// 10th percentile of the token log-probabilities.
    pub logprob_p10: f32,
    /// 25th percentile of the top-1 / top-2 margins.
    pub margin_p25: f32,
}

/// Escalate when either signal falls below its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    pub logprob_p10: f32,
    pub margin_p25: f32,
}

impl Default for Thresholds {
    /// Calibrated (`hearth route calibrate --target-large-share 0.3`) on the `tune` half of
    /// benches/route_set.jsonl with the default models: escalate when the low tail holds a token
    /// under ~11% probability, or a quarter of the tokens were near ties (see benches/RESULTS.md,
    /// "Router": the 40% row escalated more and spent more large-model time than it gained).
    fn default() -> Self {
        Self {
            logprob_p10: -2.245,
            margin_p25: 0.075,
        }
    }
}

/// The `q` quantile (0..=1) of `v` by the nearest-rank rule on the sorted values (low side).
fn quantile(v: &mut [f32], q: f32) -> f32 {
    v.sort_unstable_by(f32::total_cmp);
    let i = ((v.len() - 1) as f32 * q).floor() as usize;
    v[i]
}

impl Signals {
    /// None when no token was probed (the cheaper model stopped at once).
    pub fn of(probes: &[Probe]) -> Option<Self> {
        if probes.is_empty() {
            return None;
        }
        let mut lp: Vec<f32> = probes.iter().map(|p| p.logprob).collect();
        let mut margin: Vec<f32> = probes.iter().map(|p| p.margin).collect();
        Some(Self {
            tokens: probes.len(),
            logprob_p10: quantile(&mut lp, 0.10),
            margin_p25: quantile(&mut margin, 0.25),
        })
    }

    /// The reason to escalate, if any.
    pub fn doubt(&self, t: &Thresholds) -> Option<&'static str> {
        if self.logprob_p10 < t.logprob_p10 {
            Some("low_logprob")
        } else if self.margin_p25 < t.margin_p25 {
            Some("low_margin")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes(v: &[(f32, f32)]) -> Vec<Probe> {
        v.iter()
            .map(|&(logprob, margin)| Probe { logprob, margin })
            .collect()
    }

    #[test]
    fn one_unsure_token_in_ten_is_seen_where_a_mean_would_hide_it() {
        let mut v = vec![(-0.01, 6.0); 9];
        v.push((-4.0, 0.1));
        let s = Signals::of(&probes(&v)).unwrap();
        assert_eq!(s.logprob_p10, -4.0);
        let mean = v.iter().map(|p| p.0).sum::<f32>() / v.len() as f32;
        assert!(mean > -0.5, "the mean ({mean}) looks confident");
        assert_eq!(s.doubt(&Thresholds::default()), Some("low_logprob"));
    }

    #[test]
    fn confident_tokens_keep_and_close_runners_up_escalate() {
        let sure = Signals::of(&probes(&[(-0.1, 3.0); 8])).unwrap();
        assert_eq!(sure.doubt(&Thresholds::default()), None);
        let mut v = vec![(-0.6, 0.05); 3];
        v.extend([(-0.1, 3.0); 5]);
        let torn = Signals::of(&probes(&v)).unwrap();
        assert_eq!(torn.margin_p25, 0.05);
        assert_eq!(torn.doubt(&Thresholds::default()), Some("low_margin"));
        assert!(Signals::of(&[]).is_none());
    }
}
