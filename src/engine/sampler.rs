//! Token sampling: greedy, temperature, top-k, top-p, min-p, repetition / presence / frequency
//! penalties, per-request seeds, and log-probabilities of the chosen and the top-n tokens.
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{HearthError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no limit.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Multiplicative penalty (HF style) on tokens seen in the prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// Additive penalties (OpenAI style) on tokens seen in the output.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
    /// None: until the context is full.
    pub max_tokens: Option<usize>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Number of top alternatives to return with each token's log-probability; None: no logprobs.
    pub logprobs: Option<usize>,
    /// Added to a token's logit before it is picked (OpenAI's `logit_bias`, -100..100); reported
    /// log-probabilities stay those of the model.
    pub logit_bias: Vec<(u32, f32)>,
    /// The first this many generated tokens also report their top-1 / top-2 margin (the router's
    /// doubt signal); they need the whole logit row.
    #[serde(default)]
    pub probe_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            logit_bias: Vec::new(),
            probe_tokens: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(HearthError::InvalidRequest(m.to_string()));
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad("temperature must be between 0 and 100");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty must be > 0");
        }
        if !((-2.0..=2.0).contains(&self.presence_penalty)
            && (-2.0..=2.0).contains(&self.frequency_penalty))
        {
            return bad("presence_penalty and frequency_penalty must be between -2 and 2");
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens must be at least 1");
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return bad("top_logprobs must be at most 20");
        }
        if self
            .logit_bias
            .iter()
            .any(|&(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(&b)))
        {
            return bad("logit_bias values must be between -100 and 100");
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// What the distribution a token was picked from says about the pick (the per-token quality
/// signals: no extra model call, the row the pick was made from).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Spread {
    /// Entropy of the model's distribution, in nats.
    pub entropy: f32,
    /// Log-probability of the most likely token minus that of the second.
    pub margin: f32,
}

impl Spread {
    /// The spread of `logits`: the greedy pick's own (one computation for both paths).
    pub fn of(logits: &[f32]) -> Self {
        let p = crate::ops::greedy::pick(logits);
        Self {
            entropy: p.entropy,
            margin: p.margin,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the model's distribution (before sampling transforms).
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
    /// For a probed token (see `SamplingParams::probe_tokens`): the log-probability of the most
    /// likely token minus that of the second (0 when they tie: the model could not choose).
    pub margin: Option<f32>,
    pub spread: Spread,
}

/// Per-sequence sampling state.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Output-token counts, for the presence and frequency penalties.
    counts: HashMap<u32, u32>,
    /// Tokens sampled so far.
    generated: usize,
    /// The output grammar's state, for a constrained request.
    guide: Option<crate::grammar::Guide>,
}

/// Next-best tokens a refused greedy pick checks before it computes the grammar's whole mask.
const CANDIDATES: usize = 8;

fn log_softmax_at(logits: &[f32], max: f32, lse: f32, i: usize) -> f32 {
    logits[i] - max - lse
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            counts: HashMap::new(),
            generated: 0,
            guide: None,
        }
    }

    /// Constrain the output to a grammar.
    pub fn with_guide(mut self, guide: crate::grammar::Guide) -> Self {
        self.guide = Some(guide);
        self
    }

    /// Compute the grammar's next mask ahead of `sample` (for a constrained request).
    pub fn prepare_mask(&mut self) {
        if let Some(g) = self.guide.as_mut() {
            g.prepare();
        }
    }

    pub fn is_constrained(&self) -> bool {
        self.guide.is_some()
    }

    /// Whether the output grammar is complete: nothing more may follow.
    pub fn grammar_finished(&self) -> bool {
        self.guide.as_ref().is_some_and(|g| g.is_finished())
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether sampling needs the whole logit row; plain greedy without logprobs needs only the argmax
    /// and the log-normalizer, which the runner computes on the device (a GPU then sends back two
    /// numbers per sequence instead of a vocabulary-sized row).
    /// A constrained request needs it only when its mask is computed ahead (`masks_ahead`, on an
    /// accelerator); otherwise the device's argmax is checked against the grammar first.
    pub fn needs_full_logits(&self, masks_ahead: bool) -> bool {
        let p = &self.params;
        (masks_ahead && self.guide.is_some())
            || !(p.is_greedy()
                && self.generated >= p.probe_tokens
                && p.repetition_penalty == 1.0
                && p.presence_penalty == 0.0
                && p.frequency_penalty == 0.0
                && p.logit_bias.is_empty()
                && p.logprobs.is_none_or(|n| n == 0))
    }

    /// Take the token the device picked by argmax, with its log-probability (see `needs_full_logits`).
    /// Under a grammar that refuses it, the pick is the masked argmax of the whole row (`row`, read
    /// only then): the row's next-best tokens are checked one by one first, and only when none of
    /// the first `CANDIDATES` passes is the whole mask computed. Inside a JSON string a mask over
    /// Gemma's 262k tokens costs 1-5 ms, a check a few microseconds, and there the next-best token is
    /// nearly always allowed (a shorter piece of the word); where few tokens are allowed (a quote, a
    /// comma) the mask itself is cheap.
    pub fn accept_greedy(
        &mut self,
        token: u32,
        logprob: f32,
        spread: Spread,
        row: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<Sampled> {
        let Some(g) = self.guide.as_mut() else {
            return Ok(self.take(token, logprob, spread));
        };
        if g.allows(token) {
            return Ok(self.take(token, logprob, spread));
        }
        let row = row()?;
        let best = row.get(token as usize).copied().ok_or_else(|| {
            HearthError::Internal(format!("argmax {token} outside a row of {}", row.len()))
        })?;
        let pick = top_n(&row, CANDIDATES + 1)
            .into_iter()
            .map(|i| i as u32)
            .filter(|&i| i != token)
            .find(|&i| g.allows(i))
            .unwrap_or_else(|| {
                let mut work = row.clone();
                g.mask(&mut work);
                argmax(&work)
            });
        // The argmax's log-probability is its logit minus the log-normalizer.
        Ok(self.take(pick, logprob + row[pick as usize] - best, spread))
    }

    fn take(&mut self, token: u32, logprob: f32, spread: Spread) -> Sampled {
        if let Some(g) = self.guide.as_mut() {
            g.commit(token);
        }
        *self.counts.entry(token).or_insert(0) += 1;
        self.generated += 1;
        Sampled {
            token,
            logprob,
            top: Vec::new(),
            margin: None,
            spread,
        }
    }

    /// Pick the next token from `logits`; `context` is the prompt plus the output so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Sampled {
        let p = &self.params;
        // Log-probabilities are reported from the raw distribution, as OpenAI and vLLM do.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();

        let mut work: Vec<f32> = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = work.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = work.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = work.get_mut(t as usize) {
                *l += b;
            }
        }
        let top_n_wanted = p.logprobs;
        // Under a grammar, the pick from the unmasked logits is checked first and kept when the
        // grammar allows it; only a refused pick pays for the whole mask, then picks again. For
        // argmax that is the masked argmax. For plain temperature sampling it is rejection
        // sampling: a token t comes out with p(t) + (1 - A) p(t) / A = p(t) / A (A: the allowed
        // mass), the masked distribution. Top-k, top-p and min-p cut the distribution by its
        // shape, so they (and a mask prepared ahead, on an accelerator) mask first.
        let check_first = self.guide.as_ref().is_some_and(|g| !g.has_ready_mask())
            && (p.is_greedy() || (p.top_k == 0 && p.top_p >= 1.0 && p.min_p == 0.0));
        let mut token = None;
        if check_first {
            let t = self.pick(&work);
            if self.guide.as_mut().is_some_and(|g| g.allows(t)) {
                token = Some(t);
            }
        }
        let token = match token {
            Some(t) => t,
            None => {
                if let Some(g) = self.guide.as_mut() {
                    g.mask(&mut work);
                }
                self.pick(&work)
            }
        };
        *self.counts.entry(token).or_insert(0) += 1;
        if let Some(g) = self.guide.as_mut() {
            g.commit(token);
        }
        let spread = Spread::of(logits);
        let margin = (self.generated < self.params.probe_tokens).then_some(spread.margin);
        self.generated += 1;

        let top = match top_n_wanted {
            Some(n) if n > 0 => top_n(logits, n)
                .into_iter()
                .map(|i| (i as u32, log_softmax_at(logits, max, lse, i)))
                .collect(),
            _ => Vec::new(),
        };
        Sampled {
            token,
            logprob: log_softmax_at(logits, max, lse, token as usize),
            top,
            margin,
            spread,
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let t = p.temperature;
        // Candidates sorted by logit, best first (ties by id, so a seed reproduces exactly).
        let mut idx: Vec<usize> = if p.top_k > 0 && p.top_k < logits.len() {
            top_n(logits, p.top_k)
        } else {
            let mut all: Vec<usize> = (0..logits.len()).collect();
            all.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            all
        };
        let max = logits[idx[0]];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / t).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);

        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        idx.truncate(keep);
        probs.truncate(keep);
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return idx[i] as u32;
            }
        }
        idx[keep - 1] as u32
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices of the `n` largest values, largest first (ties by lower index).
fn top_n(v: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(v.len());
    let cmp = |a: &usize, b: &usize| v[*b].total_cmp(&v[*a]).then(a.cmp(b));
    if n <= SCAN_TOP_N {
        return scan_top_n(v, n);
    }
    let mut idx: Vec<usize> = (0..v.len()).collect();
    if n < idx.len() {
        idx.select_nth_unstable_by(n, cmp);
        idx.truncate(n);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// Up to this many, `top_n` keeps its candidates in one pass (no vocabulary-sized index vector:
/// on a 262k vocabulary that is 2 MiB written and selected per call).
const SCAN_TOP_N: usize = 64;

fn scan_top_n(v: &[f32], n: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (i, x) in v.iter().enumerate() {
        // Scanning in index order, an equal value loses to the one already kept.
        if best.len() == n && x.total_cmp(&v[best[n - 1]]).is_le() {
            continue;
        }
        let at = best.partition_point(|&b| v[b].total_cmp(x).is_ge());
        best.insert(at, i);
        best.truncate(n);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9, -1.0]
    }

    #[test]
    fn greedy_picks_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: Some(2),
            ..SamplingParams::greedy()
        });
        let out = s.sample(&logits(), &[]);
        assert_eq!(out.token, 1);
        let l = logits();
        let lse = l.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((out.logprob - (3.0 - lse)).abs() < 1e-5);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4]);
    }

    #[test]
    fn seeds_reproduce_and_top_k_restricts() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 3,
            seed: Some(7),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50)
                .map(|_| s.sample(&logits(), &[]).token)
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(a.iter().all(|t| [1, 4, 2].contains(t)));
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature 1.5 over 3 tokens must vary"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let l = vec![10.0, 9.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&l, &[]).token == 0));
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.2,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&l, &[]).token < 2));
    }

    #[test]
    fn penalties_steer_away_from_seen_tokens() {
        let l = vec![2.0, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&l, &[0]).token, 1);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&l, &[]).token, 0);
        assert_eq!(
            s.sample(&l, &[]).token,
            1,
            "token 0 was output once: penalised"
        );
    }

    #[test]
    fn logit_bias_steers_the_pick_but_not_the_reported_logprob() {
        let l = vec![2.0, 1.9, 0.0];
        let mut plain = Sampler::new(SamplingParams::greedy());
        let want = plain.sample(&l, &[]);
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(2, 5.0), (0, -100.0)],
            ..SamplingParams::greedy()
        });
        assert!(s.needs_full_logits(false));
        let got = s.sample(&l, &[]);
        assert_eq!(got.token, 2);
        let mut p2 = Sampler::new(SamplingParams {
            logprobs: Some(3),
            ..SamplingParams::greedy()
        });
        let lp2 = p2
            .sample(&l, &[])
            .top
            .iter()
            .find(|t| t.0 == 2)
            .map(|t| t.1);
        assert_eq!(
            Some(got.logprob),
            lp2,
            "the model's log-probability of token 2"
        );
        assert_ne!(want.token, got.token);
        assert!(SamplingParams {
            logit_bias: vec![(1, 101.0)],
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn validation_rejects_out_of_range() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                max_tokens: Some(0),
                ..Default::default()
            },
        ] {
            assert!(p.validate().is_err());
        }
    }

    proptest::proptest! {
        /// The one-pass top-n keeps exactly what sorting the whole row keeps, ties by lower index.
        #[test]
        fn scanning_for_the_top_n_matches_a_full_sort(
            v in proptest::collection::vec(-4i8..4, 0..300),
            n in 0usize..=SCAN_TOP_N,
        ) {
            let v: Vec<f32> = v.into_iter().map(|x| x as f32 / 2.0).collect();
            let mut all: Vec<usize> = (0..v.len()).collect();
            all.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
            all.truncate(n);
            proptest::prop_assert_eq!(scan_top_n(&v, n.min(v.len())), all);
        }
    }
}
