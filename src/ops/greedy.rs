//! The greedy pick of CPU logit rows: each row's argmax and log-normalizer in one vectorized pass,
//! rows on the pool. Through candle this was an argmax, a max, and `exp` of every logit by libm one
//! element at a time: 262k per row for Gemma, a tenth of a 16-stream decode step.
use super::threads::{pool, OutPtr};
use super::vexp;

/// The first index of the row's maximum (NaN never wins unless at index 0, as a scalar
/// `x > best` scan), and `ln(sum(exp(l - max)))`.
pub fn argmax_lse(row: &[f32]) -> (u32, f32) {
    let best = argmax(row);
    let max = row.get(best).copied().unwrap_or(0.0);
    (best as u32, vexp::exp_sum(row, max, None).ln())
}

/// `argmax_lse` of the rows of `data` (row-major, `wanted.len()` rows) that are wanted, on the pool.
pub fn argmax_lse_rows(data: &[f32], wanted: &[bool]) -> Vec<Option<(u32, f32)>> {
    let n = data.len() / wanted.len().max(1);
    let mut out = vec![None; wanted.len()];
    let dst = OutPtr::new(&mut out);
    pool().execute_chunked(wanted.len(), |range| {
        for r in range.filter(|&r| wanted[r]) {
            // SAFETY: the task for row r writes only element r, inside `out`, which outlives the
            // loop.
            unsafe { *dst.at(r) = Some(argmax_lse(&data[r * n..(r + 1) * n])) };
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
    fn picks_the_first_maximum_and_the_log_normalizer() {
        let row: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1009) as f32 / 100.0 - 5.0)
            .collect();
        let (tok, lse) = argmax_lse(&row);
        let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(tok as usize, row.iter().position(|&x| x == best).unwrap());
        let want: f64 = row
            .iter()
            .map(|&x| ((x - best) as f64).exp())
            .sum::<f64>()
            .ln();
        assert!((lse as f64 - want).abs() < 1e-5, "{lse} vs {want}");
        let mut tie = vec![0f32; 20];
        tie[3] = 1.0;
        tie[17] = 1.0;
        tie[9] = f32::NAN;
        assert_eq!(argmax_lse(&tie).0, 3);
        tie[0] = f32::NAN;
        assert_eq!(argmax_lse(&tie).0, 0);
    }
}
