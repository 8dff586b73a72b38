//! `exp` for f32 lanes, written once as a sequence of IEEE operations (`+ - * /`, fused
//! multiply-add, round to nearest even) that the AVX2 lanes and the scalar code both perform, so an
//! element gets the same bits whichever path computes it. Range reduction to r in [-ln2/2, ln2/2]
//! and a degree-7 polynomial: within about 1 ulp of the true value. Arguments are clamped to
//! [-87, 87] (past them exp leaves f32's normal range).

pub const CLAMP: f32 = 87.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that n * LN2_HI is exact for |n| < 2^9.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1/k! for k = 7 down to 2.
const POLY: [f32; 6] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
];

/// exp(x), the definition `exp8` matches lane for lane.
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-CLAMP, CLAMP);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p.mul_add(r, *c);
    }
    let p = p.mul_add(r, 1.0).mul_add(r, 1.0);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `exp` on eight lanes.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline(always)]
pub fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); register operations only.
    unsafe {
        let set = _mm256_set1_ps;
        let x = _mm256_min_ps(_mm256_max_ps(x, set(-CLAMP)), set(CLAMP));
        let nf = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, set(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(nf, set(LN2_HI), x);
        let r = _mm256_fnmadd_ps(nf, set(LN2_LO), r);
        let mut p = set(POLY[0]);
        for c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, r, set(*c));
        }
        let p = _mm256_fmadd_ps(_mm256_fmadd_ps(p, r, set(1.0)), r, set(1.0));
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(nf),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }
}

/// sum(exp(x - shift)) over `xs`: eight lane sums in order, then added in a fixed order, then the
/// tail; each term also goes to `out` (same length) where given.
pub fn exp_sum(xs: &[f32], shift: f32, mut out: Option<&mut [f32]>) -> f32 {
    let mut lanes = [0f32; 8];
    let n = exp_sum_lanes(xs, shift, &mut lanes, out.as_deref_mut());
    let mut s = lanes.iter().sum::<f32>();
    for (i, &x) in xs.iter().enumerate().skip(n) {
        let e = exp(x - shift);
        if let Some(o) = out.as_deref_mut() {
            o[i] = e;
        }
        s += e;
    }
    s
}

/// `exp_sum(xs, shift, None)` (the same bits) and sum(exp(x - shift) * (x - shift)), the first
/// moment an entropy needs: H = ln(sum) - moment / sum for the distribution softmax(xs).
pub fn exp_sum_moment(xs: &[f32], shift: f32) -> (f32, f32) {
    let (mut lanes, mut moments) = ([0f32; 8], [0f32; 8]);
    let n = exp_moment_lanes(xs, shift, &mut lanes, &mut moments);
    let mut s = lanes.iter().sum::<f32>();
    let mut m = moments.iter().sum::<f32>();
    for &x in &xs[n..] {
        let d = x - shift;
        let e = exp(d);
        s += e;
        m = e.mul_add(d.max(-CLAMP), m);
    }
    (s, m)
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn exp_moment_lanes(xs: &[f32], shift: f32, lanes: &mut [f32; 8], moments: &mut [f32; 8]) -> usize {
    use std::arch::x86_64::*;
    let n = xs.len() / 8 * 8;
    // SAFETY: AVX2 and FMA at compile time (cfg above); loads of 8 floats at i < n <= xs.len(),
    // one store into each of `lanes` and `moments`.
    unsafe {
        let sh = _mm256_set1_ps(shift);
        let (mut acc, mut mom) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..n).step_by(8) {
            let d = _mm256_sub_ps(_mm256_loadu_ps(xs.as_ptr().add(i)), sh);
            let e = exp8(d);
            acc = _mm256_add_ps(acc, e);
            // d clamped as exp clamps it: a masked (-inf) logit adds a tiny finite term, not
            // 0 x inf. maxps returns its second operand for a NaN, as f32::max does.
            mom = _mm256_fmadd_ps(e, _mm256_max_ps(d, _mm256_set1_ps(-CLAMP)), mom);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        _mm256_storeu_ps(moments.as_mut_ptr(), mom);
    }
    n
}

/// The portable form of `exp_moment_lanes`: the same operations lane by lane.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn exp_moment_lanes(xs: &[f32], shift: f32, lanes: &mut [f32; 8], moments: &mut [f32; 8]) -> usize {
    let n = xs.len() / 8 * 8;
    for chunk in xs[..n].chunks_exact(8) {
        for (l, &x) in chunk.iter().enumerate() {
            let d = x - shift;
            let e = exp(d);
            lanes[l] += e;
            moments[l] = e.mul_add(d.max(-CLAMP), moments[l]);
        }
    }
    n
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn exp_sum_lanes(xs: &[f32], shift: f32, lanes: &mut [f32; 8], out: Option<&mut [f32]>) -> usize {
    use std::arch::x86_64::*;
    let n = xs.len() / 8 * 8;
    let out = out.map(|o| &mut o[..n]);
    // SAFETY: AVX2 and FMA at compile time (cfg above); loads of 8 floats at i < n <= xs.len(),
    // stores of 8 floats at i < n <= out.len() (sliced above), and one into `lanes`.
    unsafe {
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let dst = out.map(|o| o.as_mut_ptr());
        for i in (0..n).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xs.as_ptr().add(i)), sh));
            if let Some(d) = dst {
                _mm256_storeu_ps(d.add(i), e);
            }
            acc = _mm256_add_ps(acc, e);
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    }
    n
}

/// The portable form of the lane sums: lane l holds elements l, l + 8, ... in order.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn exp_sum_lanes(
    xs: &[f32],
    shift: f32,
    lanes: &mut [f32; 8],
    mut out: Option<&mut [f32]>,
) -> usize {
    let n = xs.len() / 8 * 8;
    for (c, chunk) in xs[..n].chunks_exact(8).enumerate() {
        for (l, (&x, lane)) in chunk.iter().zip(lanes.iter_mut()).enumerate() {
            let e = exp(x - shift);
            if let Some(o) = out.as_deref_mut() {
                o[8 * c + l] = e;
            }
            *lane += e;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    #[test]
    fn lanes_match_the_scalar_definition_and_are_accurate() {
        let xs: Vec<f32> = (-19300..19300).map(|i| i as f32 * 0.0045).collect();
        for &x in &xs {
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON as f64 * want,
                "exp({x}): {got} vs {want}"
            );
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ))]
        for c in xs.chunks_exact(8) {
            use std::arch::x86_64::*;
            let mut out = [0f32; 8];
            // SAFETY: AVX2 at compile time; 8 floats in and out.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), super::exp8(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, o) in c.iter().zip(out) {
                assert_eq!(o.to_bits(), super::exp(*x).to_bits(), "exp({x})");
            }
        }
    }

    #[test]
    fn the_moment_pass_sums_as_exp_sum_and_gives_the_entropy() {
        for n in [0usize, 3, 8, 1003] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1009) as f32 / 100.0 - 5.0)
                .collect();
            let shift = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let shift = if shift.is_finite() { shift } else { 0.0 };
            let (sum, moment) = super::exp_sum_moment(&xs, shift);
            assert_eq!(sum.to_bits(), super::exp_sum(&xs, shift, None).to_bits());
            if n == 0 {
                continue;
            }
            let z: f64 = xs.iter().map(|&x| (x as f64 - shift as f64).exp()).sum();
            let want: f64 = -xs
                .iter()
                .map(|&x| {
                    let lp = x as f64 - shift as f64 - z.ln();
                    lp.exp() * lp
                })
                .sum::<f64>();
            let got = sum.ln() - moment / sum;
            assert!((got as f64 - want).abs() < 1e-4, "n {n}: {got} vs {want}");
        }
        // Masked logits (-inf, f32::MIN) leave the entropy finite and as if they were absent.
        let mut xs: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.3).collect();
        let (s0, m0) = super::exp_sum_moment(&xs, 1.8);
        xs.extend([f32::NEG_INFINITY, f32::MIN, f32::NEG_INFINITY]);
        let (s1, m1) = super::exp_sum_moment(&xs, 1.8);
        assert!(m1.is_finite());
        let h = |s: f32, m: f32| s.ln() - m / s;
        assert!((h(s0, m0) - h(s1, m1)).abs() < 1e-5);
    }

    #[test]
    fn exp_sum_writes_each_term_and_sums_them_the_same_way_either_way() {
        for n in [0usize, 5, 8, 203] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 101) as f32 / 10.0 - 9.0)
                .collect();
            let mut out = vec![0f32; n];
            let with = super::exp_sum(&xs, 1.5, Some(&mut out));
            assert_eq!(with.to_bits(), super::exp_sum(&xs, 1.5, None).to_bits());
            for (x, o) in xs.iter().zip(&out) {
                assert_eq!(o.to_bits(), super::exp(x - 1.5).to_bits());
            }
            let want: f64 = xs.iter().map(|&x| (x as f64 - 1.5).exp()).sum();
            assert!(
                (with as f64 - want).abs() <= 1e-5 * want.max(1.0),
                "{with} vs {want}"
            );
        }
    }
}
