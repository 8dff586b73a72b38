//! Splitting a step's measured device time over the sequences that shared it.
//!
//! A batched step is one forward pass; its device time is measured once (CUDA events on a GPU, the
//! forward's wall time on the CPU). Each sequence's share is proportional to the work the step did
//! for it, counted in multiply-accumulates (MACs):
//!
//! ```text
//! cost = new_tokens x W                 every new token passes each linear-layer weight once
//!      + logit_rows x (hidden x vocab)  the output projection, run only for rows that sample
//!      + attended   x 2 x q_dim         per layer: Q.K^T and the weighted sum of V
//! ```
//!
//! where `W` is the number of weights in the layers' linear projections (Q, K, V, O, gate, up,
//! down: taken from the loaded weights), `q_dim = n_heads x head_dim`, and `attended` is, summed
//! over the layers, the context positions each new token attends to (position `p` attends to `p + 1`
//! tokens, or to the window on a sliding-window layer). Norms, RoPE, activations and sampling are
//! left out: linear in the tokens like `W` and a few percent of it.
//!
//! Shares are rounded to nanoseconds by largest remainder, so a step's shares add up to its
//! measured time exactly (conservation), and time with no step running is nobody's.
use std::time::Duration;

/// The per-model constants of the cost model.
#[derive(Debug, Clone)]
pub struct CostModel {
    /// Weights in the linear projections of all layers: MACs per new token.
    pub per_token: u64,
    /// hidden x vocab: MACs per sampled row.
    pub per_logits_row: u64,
    /// 2 x n_heads x head_dim: MACs per attended position per layer.
    pub per_attended: u64,
    /// Each layer's sliding window (None: full attention).
    pub windows: Vec<Option<usize>>,
}

impl CostModel {
    /// Positions attended by tokens `first_pos .. first_pos + tokens`, summed over the layers.
    fn attended(&self, first_pos: usize, tokens: usize) -> u128 {
        // Token at position p attends to min(p + 1, window) positions.
        let full = |from: u128, n: u128| n * (2 * from + n + 1) / 2;
        let (first, n) = (first_pos as u128, tokens as u128);
        self.windows
            .iter()
            .map(|w| match w {
                None => full(first, n),
                Some(w) => {
                    let w = *w as u128;
                    // Positions below w - 1 attend to p + 1 < w; from w - 1 on, to w.
                    let ramp_end = (w.saturating_sub(1)).clamp(first, first + n);
                    full(first, ramp_end - first) + (first + n - ramp_end) * w
                }
            })
            .sum()
    }

    /// The work a step does for one sequence: `tokens` new tokens from `first_pos`, and a logits
    /// row if it samples.
    pub fn cost(&self, first_pos: usize, tokens: usize, samples: bool) -> u128 {
        tokens as u128 * self.per_token as u128
            + if samples {
                self.per_logits_row as u128
            } else {
                0
            }
            + self.attended(first_pos, tokens) * self.per_attended as u128
    }
}

/// `total` split in proportion to `costs`, in whole nanoseconds that add up to `total` exactly
/// (largest remainder). All-zero costs split evenly.
pub fn split(total: Duration, costs: &[u128]) -> Vec<Duration> {
    let total_ns = total.as_nanos();
    if costs.is_empty() {
        return Vec::new();
    }
    let sum: u128 = costs.iter().sum();
    let (costs, sum): (Vec<u128>, u128) = if sum == 0 {
        (vec![1; costs.len()], costs.len() as u128)
    } else {
        (costs.to_vec(), sum)
    };
    let mut shares: Vec<u128> = costs.iter().map(|c| total_ns * c / sum).collect();
    let mut rest = total_ns - shares.iter().sum::<u128>();
    let mut order: Vec<usize> = (0..costs.len()).collect();
    // Largest remainders first; ties to the earlier sequence, so the split is deterministic.
    order.sort_by_key(|&i| std::cmp::Reverse(total_ns * costs[i] % sum));
    for i in order {
        if rest == 0 {
            break;
        }
        shares[i] += 1;
        rest -= 1;
    }
    shares
        .into_iter()
        .map(|ns| Duration::from_nanos(ns as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(windows: Vec<Option<usize>>) -> CostModel {
        CostModel {
            per_token: 1000,
            per_logits_row: 500,
            per_attended: 10,
            windows,
        }
    }

    #[test]
    fn attention_counts_each_new_tokens_context() {
        let m = model(vec![None]);
        // Positions 0..4 attend to 1+2+3+4 positions.
        assert_eq!(m.attended(0, 4), 10);
        // Decode at position 99 attends to 100.
        assert_eq!(m.attended(99, 1), 100);
        // A chunk is the sum of its tokens taken one at a time.
        let one_by_one: u128 = (37..37 + 20).map(|p| m.attended(p, 1)).sum();
        assert_eq!(m.attended(37, 20), one_by_one);
        let w = model(vec![Some(8), None]);
        let by_token: u128 = (0..30).map(|p| (p + 1).min(8) + (p + 1)).sum();
        assert_eq!(w.attended(0, 30), by_token);
        assert_eq!(w.attended(100, 1), 8 + 101);
        assert_eq!(w.cost(100, 1, true), 1000 + 500 + 109 * 10);
        assert_eq!(w.cost(0, 3, false), 3000 + (1 + 2 + 3) * 2 * 10);
    }

    #[test]
    fn shares_add_up_to_the_step_exactly_and_follow_the_costs() {
        let total = Duration::from_nanos(1_000_003);
        let shares = split(total, &[1, 1, 1]);
        assert_eq!(shares.iter().sum::<Duration>(), total);
        assert_eq!(
            shares,
            vec![
                Duration::from_nanos(333_335),
                Duration::from_nanos(333_334),
                Duration::from_nanos(333_334)
            ]
        );
        let shares = split(Duration::from_millis(10), &[3, 1, 0]);
        assert_eq!(
            shares,
            vec![
                Duration::from_nanos(7_500_000),
                Duration::from_nanos(2_500_000),
                Duration::ZERO
            ]
        );
        let zero = split(Duration::from_nanos(5), &[0, 0]);
        assert_eq!(zero.iter().sum::<Duration>(), Duration::from_nanos(5));
        assert!(split(total, &[]).is_empty());
    }
}
