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
}
