//! The greedy pick of CPU logit rows: each row's argmax and log-normalizer in one vectorized pass,
//! rows on the pool. Through candle this was an argmax, a max, and `exp` of every logit by libm one
//! element at a time: 262k per row for Gemma, a tenth of a 16-stream decode step.
use super::threads::{pool, OutPtr};
use super::vexp;

/// A greedy pick from one row of logits, and what the row's distribution says about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// The first index of the row's maximum (NaN never wins unless at index 0, as a scalar
    /// `x > best` scan).
    pub token: u32,
    /// `ln(sum(exp(l - max)))`: the pick's log-probability is its negative.
    pub lse: f32,
    /// The distribution's entropy in nats.
    pub entropy: f32,
    /// The best logit minus the second best (the top-1 / top-2 log-probability gap; infinite for
    /// a one-element row).
    pub margin: f32,
}

/// The pick of `row`: one pass for the maximum, one for the normalizer and the entropy's moment,
/// one for the runner-up.
pub fn pick(row: &[f32]) -> Pick {
    let best = argmax(row);
    let max = row.get(best).copied().unwrap_or(0.0);
    let (sum, moment) = vexp::exp_sum_moment(row, max);
    let lse = sum.ln();
    let second =
        max_of(&row[..best.min(row.len())]).max(max_of(row.get(best + 1..).unwrap_or(&[])));
    Pick {
        token: best as u32,
        lse,
        entropy: (lse - moment / sum).max(0.0),
        margin: max - second,
    }
}

/// The pick's token and normalizer alone, without the spread (what `pick` adds is measured
/// against it in benches/quality_cost.rs).
pub fn argmax_lse(row: &[f32]) -> (u32, f32) {
    let best = argmax(row);
    let max = row.get(best).copied().unwrap_or(0.0);
    (best as u32, vexp::exp_sum(row, max, None).ln())
}

/// `pick` of the rows of `data` (row-major, `wanted.len()` rows) that are wanted, on the pool.
pub fn pick_rows(data: &[f32], wanted: &[bool]) -> Vec<Option<Pick>> {
    let n = data.len() / wanted.len().max(1);
    let mut out = vec![None; wanted.len()];
    let dst = OutPtr::new(&mut out);
    pool().execute_chunked(wanted.len(), |range| {
        for r in range.filter(|&r| wanted[r]) {
            // SAFETY: the task for row r writes only element r, inside `out`, which outlives the
            // loop.
            unsafe { *dst.at(r) = Some(pick(&data[r * n..(r + 1) * n])) };
        }
    });
    out
}

fn argmax(v: &[f32]) -> usize {
    match v.first() {
        None => 0,
        Some(x) if x.is_nan() => 0,
        // The largest non-NaN value, then its first index.
        Some(_) => {
            let max = max_of(v);
            v.iter().position(|&x| x == max).unwrap_or(0)
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn max_of(v: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = v.len() / 8 * 8;
    // SAFETY: AVX2 at compile time (cfg above); loads of 8 floats at i < n <= v.len().
    let lanes = unsafe {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..n).step_by(8) {
            // maxps returns its second operand when either is NaN: NaN logits are skipped.
            m = _mm256_max_ps(_mm256_loadu_ps(v.as_ptr().add(i)), m);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), m);
        out
    };
    lanes
        .into_iter()
        .chain(v[n..].iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn max_of(v: &[f32]) -> f32 {
    v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_maximum_the_log_normalizer_the_entropy_and_the_margin() {
        let row: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1009) as f32 / 100.0 - 5.0)
            .collect();
        let p = pick(&row);
        let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(
            p.token as usize,
            row.iter().position(|&x| x == best).unwrap()
        );
        let z: f64 = row.iter().map(|&x| ((x - best) as f64).exp()).sum::<f64>();
        assert!(
            (p.lse as f64 - z.ln()).abs() < 1e-5,
            "{} vs {}",
            p.lse,
            z.ln()
        );
        let entropy: f64 = -row
            .iter()
            .map(|&x| {
                let lp = (x - best) as f64 - z.ln();
                lp.exp() * lp
            })
            .sum::<f64>();
        assert!((p.entropy as f64 - entropy).abs() < 1e-4);
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(p.margin, sorted[0] - sorted[1]);
        let mut tie = vec![0f32; 20];
        tie[3] = 1.0;
        tie[17] = 1.0;
        tie[9] = f32::NAN;
        assert_eq!((pick(&tie).token, pick(&tie).margin), (3, 0.0));
        tie[0] = f32::NAN;
        assert_eq!(pick(&tie).token, 0);
        // A certain pick: no entropy, an infinite margin for a single-token row.
        let one = pick(&[2.0]);
        assert_eq!((one.token, one.entropy), (0, 0.0));
        assert!(one.margin.is_infinite());
    }
}
