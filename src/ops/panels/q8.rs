//! The activation quantizers of the panel kernels (Q8_0, Q8_1 and Q8_K blocks), vectorized, giving
//! the bytes of candle's `from_float` exactly.
//!
//! candle quantizes one value at a time through `f32::round`, a libm call per value: 7% of Gemma's
//! 16-stream decode step. Its arithmetic is a maximum, one division, one product and a rounding
//! per value, all exact or correctly rounded IEEE operations, so eight lanes reproduce it bit for
//! bit; the rounding (half away from zero) is truncation plus one where the exact fraction is at
//! least a half. Blocks holding a NaN or an infinity, or whose scale overflows, go to candle's own
//! code (its saturating casts are not worth reproducing for them).
use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType};
use half::f16;

/// Bytes of a Q8_0, Q8_1 and Q8_K block in candle's layout.
const Q8_0_BYTES: usize = 34;
const Q8_1_BYTES: usize = 36;
const Q8K_BYTES: usize = 292;
/// The largest of them: a buffer that holds any block.
pub const MAX_BYTES: usize = Q8K_BYTES;

/// One activation block format: values per block, bytes per block, and its quantizer.
#[derive(Clone, Copy)]
pub struct Block {
    pub values: usize,
    pub bytes: usize,
    pub quantize: fn(&[f32], &mut [u8]),
}

pub const Q8_0: Block = Block {
    values: 32,
    bytes: Q8_0_BYTES,
    quantize: q8_0,
};
pub const Q8_1: Block = Block {
    values: 32,
    bytes: Q8_1_BYTES,
    quantize: q8_1,
};
pub const Q8K: Block = Block {
    values: 256,
    bytes: Q8K_BYTES,
    quantize: q8k,
};

/// One block of `x` (32 or 256 values) quantized by candle's `B::from_float`, as bytes.
fn reference<B: GgmlType + Clone>(x: &[f32], out: &mut [u8]) {
    // SAFETY: all-zero bits are a valid Q8_0 / Q8_1 / Q8_K block (f16, f32 and integer zeros).
    let mut q = [unsafe { std::mem::zeroed::<B>() }];
    B::from_float(x, &mut q);
    let size = std::mem::size_of::<B>();
    // SAFETY: the blocks are repr(C) structs of f16 / f32 and integer fields with no padding
    // (34, 36 and 292 bytes: 2 + 32, 2 + 2 + 32, 4 + 256 + 32); we only read their bytes.
    let raw = unsafe { std::slice::from_raw_parts(q.as_ptr() as *const u8, size) };
    out[..size].copy_from_slice(raw);
}

/// candle's `BlockQ8_0::from_float` of 32 values into `out` (34 bytes: f16 scale, 32 values).
pub fn q8_0(x: &[f32], out: &mut [u8]) {
    if !simd::q8_0(x, out) {
        reference::<BlockQ8_0>(x, out);
    }
}

/// candle's `BlockQ8_1::from_float` of 32 values (36 bytes: f16 scale, f16 scaled sum, values).
pub fn q8_1(x: &[f32], out: &mut [u8]) {
    if !simd::q8_1(x, out) {
        reference::<BlockQ8_1>(x, out);
    }
}

/// candle's `BlockQ8K::from_float` of 256 values (292 bytes: f32 scale, values, 16 i16 sums).
pub fn q8k(x: &[f32], out: &mut [u8]) {
    if !simd::q8k(x, out) {
        reference::<BlockQ8K>(x, out);
    }
}

fn sum_i8(q: &[u8]) -> i32 {
    q.iter().map(|&v| v as i8 as i32).sum()
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod simd {
    use super::*;
    use std::arch::x86_64::*;

    /// The largest |x| and whether every value is finite.
    ///
    /// # Safety
    /// AVX2 is enabled at compile time (cfg above); `x.len()` is a multiple of 8.
    unsafe fn amax(x: &[f32]) -> (f32, bool) {
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let big = _mm256_set1_ps(f32::MAX);
            let mut m = _mm256_setzero_ps();
            let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
            for c in x.chunks_exact(8) {
                let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr()));
                // Ordered compare: false for NaN as for infinities.
                finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, big, _CMP_LE_OQ));
                m = _mm256_max_ps(m, a);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let all = _mm256_movemask_ps(finite) == 0xff;
            (lanes.iter().fold(0f32, |a, &b| a.max(b)), all)
        }
    }

    /// `round(x[i] * scale)` (half away from zero) as i8, for every value, into `out`.
    ///
    /// # Safety
    /// AVX2 is enabled at compile time; `x.len()` is a multiple of 32, `out` as long; every
    /// product is finite and within i8's range once rounded.
    unsafe fn round_scaled(x: &[f32], scale: f32, out: &mut [u8]) {
        unsafe {
            let s = _mm256_set1_ps(scale);
            let sign = _mm256_set1_ps(-0.0);
            let half = _mm256_set1_ps(0.5);
            let one = _mm256_set1_ps(1.0);
            let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let round = |i: usize| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s);
                let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                // v - trunc(v) is exact; a fraction of at least one half rounds away from zero.
                let away = _mm256_cmp_ps(
                    _mm256_andnot_ps(sign, _mm256_sub_ps(v, t)),
                    half,
                    _CMP_GE_OQ,
                );
                let step = _mm256_or_ps(_mm256_and_ps(v, sign), one);
                _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)))
            };
            for (j, o) in out.chunks_exact_mut(32).enumerate() {
                let i = 32 * j;
                let ab = _mm256_packs_epi32(round(i), round(i + 8));
                let cd = _mm256_packs_epi32(round(i + 16), round(i + 24));
                let q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
                _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, q);
            }
        }
    }

    /// Q8_0 / Q8_1's scale and values; `None` where the block goes to the reference.
    fn block_32(x: &[f32], qs: &mut [u8]) -> Option<f16> {
        assert!(x.len() == 32 && qs.len() == 32);
        // SAFETY: AVX2 is enabled (cfg above); 32 values.
        let (amax, finite) = unsafe { amax(x) };
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !finite || !id.is_finite() {
            return None;
        }
        // SAFETY: as above; |x| <= amax, so |x * id| <= 127 (plus rounding) and finite.
        unsafe { round_scaled(x, id, qs) };
        Some(f16::from_f32(d))
    }

    pub fn q8_0(x: &[f32], out: &mut [u8]) -> bool {
        let (head, qs) = out[..Q8_0_BYTES].split_at_mut(2);
        let Some(d) = block_32(x, qs) else {
            return false;
        };
        head.copy_from_slice(&d.to_le_bytes());
        true
    }

    pub fn q8_1(x: &[f32], out: &mut [u8]) -> bool {
        let (head, qs) = out[..Q8_1_BYTES].split_at_mut(4);
        let Some(d) = block_32(x, qs) else {
            return false;
        };
        let s = f16::from_f32(sum_i8(qs) as f32) * d;
        head[..2].copy_from_slice(&d.to_le_bytes());
        head[2..].copy_from_slice(&s.to_le_bytes());
        true
    }

    pub fn q8k(x: &[f32], out: &mut [u8]) -> bool {
        assert!(x.len() == 256);
        let out = &mut out[..Q8K_BYTES];
        // SAFETY: AVX2 is enabled (cfg above); 256 values.
        let (amax, finite) = unsafe { amax(x) };
        if !finite {
            return false;
        }
        if amax == 0.0 {
            out.fill(0);
            return true;
        }
        // The reference keeps the first value of the largest magnitude, with its sign.
        let Some(&max) = x.iter().find(|v| v.abs() == amax) else {
            return false;
        };
        let iscale = -127.0 / max;
        if !iscale.is_finite() {
            return false;
        }
        let (d, rest) = out.split_at_mut(4);
        let (qs, sums) = rest.split_at_mut(256);
        // SAFETY: as above; |x| <= |max|, so |iscale * x| <= 127 (plus rounding) and finite.
        unsafe { round_scaled(x, iscale, qs) };
        for (s, q) in sums.chunks_exact_mut(2).zip(qs.chunks_exact(16)) {
            s.copy_from_slice(&(sum_i8(q) as i16).to_le_bytes());
        }
        d.copy_from_slice(&(1.0 / iscale).to_le_bytes());
        true
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
mod simd {
    pub fn q8_0(_: &[f32], _: &mut [u8]) -> bool {
        false
    }
    pub fn q8_1(_: &[f32], _: &mut [u8]) -> bool {
        false
    }
    pub fn q8k(_: &[f32], _: &mut [u8]) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of every magnitude, exact halves at every scale, zeros, ties for the largest
    /// magnitude, tiny and non-finite blocks.
    fn cases(block: usize) -> Vec<Vec<f32>> {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut out = Vec::new();
        for scale in [1e-30f32, 1e-6, 0.01, 1.0, 3.0, 1e4, 1e30] {
            for _ in 0..200 {
                out.push(
                    (0..block)
                        .map(|_| ((next() % 20001) as f32 / 10000.0 - 1.0) * scale)
                        .collect(),
                );
            }
        }
        // Values that land on exact halves once scaled by 127 / amax = 1 (amax 127).
        let mut halves: Vec<f32> = (0..block).map(|i| i as f32 / 2.0 - 10.25).collect();
        halves[0] = 127.0;
        out.push(halves.iter().map(|v| -v).collect());
        out.push(halves);
        let mut ties = vec![0.5f32; block];
        ties[3] = -2.0;
        ties[9] = 2.0;
        out.push(ties.clone());
        ties[3] = 2.0;
        ties[9] = -2.0;
        out.push(ties);
        out.push(vec![0.0; block]);
        out.push(vec![-0.0; block]);
        for special in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-45,
            1e-38,
            f32::MAX,
        ] {
            let mut v = vec![0.25f32; block];
            v[5] = special;
            out.push(v.clone());
            v.iter_mut().for_each(|x| *x = special);
            out.push(v);
        }
        out
    }

    fn check(
        block: usize,
        bytes: usize,
        fast: fn(&[f32], &mut [u8]),
        slow: fn(&[f32], &mut [u8]),
        vector: fn(&[f32], &mut [u8]) -> bool,
    ) {
        // The vector path takes ordinary blocks (where the CPU build has it).
        let ordinary: Vec<f32> = (0..block).map(|i| (i as f32 * 0.37).sin()).collect();
        assert_eq!(
            vector(&ordinary, &mut vec![0; bytes]),
            cfg!(all(target_arch = "x86_64", target_feature = "avx2"))
        );
        for x in cases(block) {
            let (mut a, mut b) = (vec![0xaau8; bytes], vec![0x55u8; bytes]);
            fast(&x, &mut a);
            slow(&x, &mut b);
            assert_eq!(a, b, "block {x:?}");
        }
    }

    #[test]
    fn q8_0_is_candles_bytes() {
        check(32, Q8_0_BYTES, q8_0, reference::<BlockQ8_0>, simd::q8_0);
    }

    #[test]
    fn q8_1_is_candles_bytes() {
        check(32, Q8_1_BYTES, q8_1, reference::<BlockQ8_1>, simd::q8_1);
    }

    #[test]
    fn q8k_is_candles_bytes() {
        check(256, Q8K_BYTES, q8k, reference::<BlockQ8K>, simd::q8k);
    }
}
