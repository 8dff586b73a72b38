//! Answer-quality signals of a response, from the tokens it generated and the distributions they
//! were picked from (no extra model call): how sure the model was of its tokens (mean, 10th
//! percentile and lowest log-probability), how spread its distributions were (mean entropy, mean
//! gap between the best and second-best token), whether it repeated itself (the share of its
//! 4-token sequences that had already occurred in it), and whether it ran out of tokens. `Drift`
//! keeps each model's signals by the minute for a day, to compare the last hour with the day
//! before it.
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock, PoisonError};

use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::sampler::Sampled;
use crate::telemetry::names;

/// Length of the token sequences whose repeats count as repetition.
const NGRAM: usize = 4;

/// One choice's generated tokens, as they come.
#[derive(Debug, Default)]
pub struct Tracker {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    entropy: f64,
    margin: f64,
    margins: usize,
}

impl Tracker {
    pub fn push(&mut self, s: &Sampled) {
        self.tokens.push(s.token);
        // Non-finite values (NaN logits) would poison every mean and histogram they reach.
        if !(s.logprob.is_finite() && s.spread.entropy.is_finite()) {
            return;
        }
        self.logprobs.push(s.logprob);
        self.entropy += f64::from(s.spread.entropy);
        // A one-token vocabulary has an infinite gap: nothing to average.
        if s.spread.margin.is_finite() {
            self.margin += f64::from(s.spread.margin);
            self.margins += 1;
        }
    }

    /// The signals of the tokens so far; None before the first.
    pub fn summary(&self, stopped_on_length: bool) -> Option<Quality> {
        let n = self.logprobs.len();
        if n == 0 {
            return None;
        }
        let mut sorted = self.logprobs.clone();
        sorted.sort_by(f32::total_cmp);
        let grams = self.tokens.len().saturating_sub(NGRAM - 1);
        let mut seen = std::collections::HashSet::with_capacity(grams);
        let repeated = self
            .tokens
            .windows(NGRAM)
            .filter(|w| !seen.insert(*w))
            .count();
        Some(Quality {
            tokens: self.tokens.len(),
            mean_logprob: self.logprobs.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64,
            // The nearest-rank percentile: the lowest tenth of the tokens are at or below it.
            p10_logprob: f64::from(sorted[(n - 1) / 10]),
            min_logprob: f64::from(sorted[0]),
            mean_entropy: self.entropy / n as f64,
            mean_margin: (self.margins > 0).then(|| self.margin / self.margins as f64),
            repetition: if grams > 0 {
                repeated as f64 / grams as f64
            } else {
                0.0
            },
            stopped_on_length,
        })
    }
}

/// A response's quality signals (`metrics.quality`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Quality {
    /// Generated tokens the signals are over.
    pub tokens: usize,
    /// Mean log-probability of the generated tokens under the model's distribution.
    pub mean_logprob: f64,
    /// The 10th percentile of the tokens' log-probabilities (nearest rank).
    pub p10_logprob: f64,
    pub min_logprob: f64,
    /// Mean entropy (nats) of the distributions the tokens were picked from.
    pub mean_entropy: f64,
    /// Mean gap between the most likely and the second most likely token's log-probability.
    pub mean_margin: Option<f64>,
    /// Share of the output's 4-token sequences that already occurred earlier in it (0 to 1).
    pub repetition: f64,
    /// The output ended because it reached `max_tokens` (or the context).
    pub stopped_on_length: bool,
}

impl Quality {
    /// The signals of several choices together: means weighted by tokens, the lowest 10th
    /// percentile and minimum, length-stopped if any was.
    pub fn combine(all: impl IntoIterator<Item = Quality>) -> Option<Quality> {
        let all: Vec<Quality> = all.into_iter().collect();
        let first = *all.first()?;
        if all.len() == 1 {
            return Some(first);
        }
        let n: usize = all.iter().map(|q| q.tokens).sum();
        let mean = |f: &dyn Fn(&Quality) -> f64| {
            all.iter().map(|q| f(q) * q.tokens as f64).sum::<f64>() / n.max(1) as f64
        };
        let margins: Vec<&Quality> = all.iter().filter(|q| q.mean_margin.is_some()).collect();
        let margin_tokens: usize = margins.iter().map(|q| q.tokens).sum();
        Some(Quality {
            tokens: n,
            mean_logprob: mean(&|q| q.mean_logprob),
            p10_logprob: all
                .iter()
                .map(|q| q.p10_logprob)
                .fold(f64::INFINITY, f64::min),
            min_logprob: all
                .iter()
                .map(|q| q.min_logprob)
                .fold(f64::INFINITY, f64::min),
            mean_entropy: mean(&|q| q.mean_entropy),
            mean_margin: (margin_tokens > 0).then(|| {
                margins
                    .iter()
                    .map(|q| q.mean_margin.unwrap_or(0.0) * q.tokens as f64)
                    .sum::<f64>()
                    / margin_tokens as f64
            }),
            repetition: mean(&|q| q.repetition),
            stopped_on_length: all.iter().any(|q| q.stopped_on_length),
        })
    }

    /// Record the signals in the per-model and per-route histograms.
    pub fn observe(&self, model: &str, route: &str) {
        let labels = [("model", model.to_string()), ("route", route.to_string())];
        for (name, v) in [
            (names::QUALITY_MEAN_LOGPROB, self.mean_logprob),
            (names::QUALITY_P10_LOGPROB, self.p10_logprob),
            (names::QUALITY_MIN_LOGPROB, self.min_logprob),
            (names::QUALITY_MEAN_ENTROPY, self.mean_entropy),
            (names::QUALITY_REPETITION, self.repetition),
        ] {
            metrics::histogram!(name, &labels).record(v);
        }
        if let Some(m) = self.mean_margin {
            metrics::histogram!(names::QUALITY_MEAN_MARGIN, &labels).record(m);
        }
        if self.stopped_on_length {
            metrics::counter!(names::QUALITY_LENGTH_STOPS, &labels).increment(1);
        }
        drift().record(model, self, now_minute());
    }

    /// The signals a drift is watched on, in `DRIFT_SIGNALS` order (None: not measured).
    fn drift_values(&self) -> [Option<f64>; 5] {
        [
            Some(self.mean_logprob),
            Some(self.p10_logprob),
            Some(self.mean_entropy),
            self.mean_margin,
            Some(self.repetition),
        ]
    }
}

/// The signals whose drift is exported (`signal` label).
pub const DRIFT_SIGNALS: [&str; 5] = [
    "mean_logprob",
    "p10_logprob",
    "mean_entropy",
    "mean_margin",
    "repetition",
];
/// The recent window, and how far back the baseline before it reaches, in minutes.
const HOUR: u64 = 60;
const DAY: u64 = 24 * 60;

#[derive(Debug, Clone, Copy)]
struct Minute {
    at: u64,
    sums: [f64; 5],
    counts: [u64; 5],
    responses: u64,
}

/// Means of one model's signals over a window, and how many responses it holds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    pub means: [Option<f64>; 5],
    pub responses: u64,
}

/// Every model's signals by the minute, for the last hour and the day before it.
#[derive(Debug, Default)]
pub struct Drift {
    models: Mutex<HashMap<String, VecDeque<Minute>>>,
}

fn now_minute() -> u64 {
    (crate::ledger::now_ms().max(0) as u64) / 60_000
}

/// The process's drift tracker (metrics are process-wide too).
pub fn drift() -> &'static Drift {
    static DRIFT: OnceLock<Drift> = OnceLock::new();
    DRIFT.get_or_init(Drift::default)
}

impl Drift {
    pub fn record(&self, model: &str, q: &Quality, minute: u64) {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let series = models.entry(model.to_string()).or_default();
        if series.back().is_none_or(|m| m.at != minute) {
            series.push_back(Minute {
                at: minute,
                sums: [0.0; 5],
                counts: [0; 5],
                responses: 0,
            });
        }
        while series.front().is_some_and(|m| m.at + HOUR + DAY <= minute) {
            series.pop_front();
        }
        if let Some(m) = series.back_mut() {
            m.responses += 1;
            for (i, v) in q.drift_values().into_iter().enumerate() {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    m.sums[i] += v;
                    m.counts[i] += 1;
                }
            }
        }
    }

    /// The last hour (minutes after `minute - HOUR`) and the day before it.
    pub fn windows(&self, model: &str, minute: u64) -> (Window, Window) {
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let mut acc = [([0f64; 5], [0u64; 5], 0u64); 2];
        for m in models.get(model).into_iter().flatten() {
            let w = if m.at + HOUR > minute {
                0
            } else if m.at + HOUR + DAY > minute {
                1
            } else {
                continue;
            };
            for i in 0..5 {
                acc[w].0[i] += m.sums[i];
                acc[w].1[i] += m.counts[i];
            }
            acc[w].2 += m.responses;
        }
        let window = |(sums, counts, responses): ([f64; 5], [u64; 5], u64)| Window {
            means: std::array::from_fn(|i| (counts[i] > 0).then(|| sums[i] / counts[i] as f64)),
            responses,
        };
        (window(acc[0]), window(acc[1]))
    }

    /// Set the drift gauges of `models` (at scrape time): each signal's mean over the last hour
    /// and over the day before it, their difference (0 while either is empty), and the
    /// responses behind each window (an alert wants enough of them).
    pub fn export(&self, models: &[String]) {
        let minute = now_minute();
        for model in models {
            let (hour, day) = self.windows(model, minute);
            for (w, r) in [("1h", hour.responses), ("24h", day.responses)] {
                metrics::gauge!(names::QUALITY_WINDOW_RESPONSES, "model" => model.clone(), "window" => w)
                    .set(r as f64);
            }
            for (i, signal) in DRIFT_SIGNALS.iter().enumerate() {
                let l = |w: &'static str| {
                    [
                        ("model", model.clone()),
                        ("signal", signal.to_string()),
                        ("window", w.to_string()),
                    ]
                };
                metrics::gauge!(names::QUALITY_WINDOW_MEAN, &l("1h"))
                    .set(hour.means[i].unwrap_or(0.0));
                metrics::gauge!(names::QUALITY_WINDOW_MEAN, &l("24h"))
                    .set(day.means[i].unwrap_or(0.0));
                let drift = match (hour.means[i], day.means[i]) {
                    (Some(h), Some(d)) => h - d,
                    _ => 0.0,
                };
                metrics::gauge!(names::QUALITY_DRIFT, "model" => model.clone(), "signal" => *signal)
                    .set(drift);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::Spread;

    fn token(t: u32, logprob: f32, entropy: f32, margin: f32) -> Sampled {
        Sampled {
            token: t,
            logprob,
            top: Vec::new(),
            margin: None,
            spread: Spread { entropy, margin },
        }
    }

    fn quality(mean_logprob: f64) -> Quality {
        Quality {
            tokens: 10,
            mean_logprob,
            p10_logprob: mean_logprob - 1.0,
            min_logprob: mean_logprob - 2.0,
            mean_entropy: 1.0,
            mean_margin: None,
            repetition: 0.0,
            stopped_on_length: false,
        }
    }

    #[test]
    fn drift_compares_the_last_hour_with_the_day_before() {
        let d = Drift::default();
        let t0 = 1_000_000;
        // A day of confident answers, then an hour of doubtful ones.
        for m in 0..DAY {
            d.record("m", &quality(-0.2), t0 + m);
        }
        for m in DAY..DAY + HOUR {
            d.record("m", &quality(-1.0), t0 + m);
            d.record("m", &quality(-1.0), t0 + m);
        }
        let now = t0 + DAY + HOUR - 1;
        let (hour, day) = d.windows("m", now);
        assert_eq!((hour.responses, day.responses), (2 * HOUR, DAY));
        assert!((hour.means[0].unwrap() + 1.0).abs() < 1e-9);
        assert!((day.means[0].unwrap() + 0.2).abs() < 1e-9);
        assert_eq!((hour.means[3], day.means[3]), (None, None));
        // Older than the day before the last hour: dropped.
        d.record("m", &quality(-1.0), now + DAY);
        let (hour, day) = d.windows("m", now + DAY);
        assert_eq!(hour.responses, 1);
        assert_eq!(day.responses, 2 * HOUR);
        assert_eq!(d.windows("other", now), Default::default());
    }

    #[test]
    fn signals_follow_the_tokens() {
        let mut t = Tracker::default();
        assert!(t.summary(false).is_none());
        // Twenty tokens: a 4-token loop "1 2 3 4" five times, log-probabilities -0.1 .. -2.0.
        for i in 0..20u32 {
            t.push(&token(i % 4 + 1, -0.1 * (i + 1) as f32, 0.5, 2.0));
        }
        let q = t.summary(true).unwrap();
        assert_eq!(q.tokens, 20);
        assert!((q.mean_logprob + 1.05).abs() < 1e-6);
        // Nearest rank: the second lowest of twenty.
        assert!((q.p10_logprob + 1.9).abs() < 1e-6, "{}", q.p10_logprob);
        assert!((q.min_logprob + 2.0).abs() < 1e-6);
        assert!((q.mean_entropy - 0.5).abs() < 1e-6);
        assert_eq!(q.mean_margin, Some(2.0));
        // 17 four-grams, of which only the first 4 are new.
        assert!((q.repetition - 13.0 / 17.0).abs() < 1e-9);
        assert!(q.stopped_on_length);
        // Distinct tokens: no repetition.
        let mut d = Tracker::default();
        for i in 0..10 {
            d.push(&token(i, -1.0, 1.0, f32::INFINITY));
        }
        let qd = d.summary(false).unwrap();
        assert_eq!((qd.repetition, qd.mean_margin), (0.0, None));
        let both = Quality::combine([q, qd]).unwrap();
        assert_eq!(both.tokens, 30);
        assert!((both.mean_logprob - (-1.05 * 20.0 - 10.0) / 30.0).abs() < 1e-6);
        assert!((both.min_logprob + 2.0).abs() < 1e-6);
        assert_eq!(both.mean_margin, Some(2.0));
        assert!(both.stopped_on_length);
    }
}
