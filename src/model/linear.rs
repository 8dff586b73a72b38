//! Linear layers. Candle's CPU Q4_1 matmul has no SIMD kernel and decodes every weight block once per
//! activation row, so batching rows gains nothing. `Linear::Q4_1` decodes each weight block once per
//! tile of rows and runs the integer dot products in a form the compiler vectorises. Each output is
//! computed with exactly candle's arithmetic (8-bit activations from candle's own quantizer, the same
//! per-block float expression in the same order), so results are bit-identical to candle's and do
//! not depend on how many rows share the call.
use candle_core::quantized::k_quants::{BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;

const QK: usize = 32;
const Q4_1_BYTES: usize = 20;
const Q8_1_BYTES: usize = 36;
/// Activation rows that share one decoded weight block.
const ROW_TILE: usize = 8;
/// From this many rows on, the tiled kernel beats candle's (measured with examples in benches/).
const TILED_MIN_ROWS: usize = 2;

#[derive(Debug)]
pub enum Linear {
    /// Q4_1 weights on the CPU: (n, k) blocks, as stored in the file. Below `TILED_MIN_ROWS` rows
    /// candle's own kernel is faster (and gives the same bits), so both are kept.
    Q4_1 {
        data: Vec<u8>,
        n: usize,
        k: usize,
        candle: QMatMul,
    },
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        let dims = t.shape().dims().to_vec();
        if t.dtype() == GgmlDType::Q4_1
            && t.device().is_cpu()
            && dims.len() == 2
            && dims[1].is_multiple_of(QK)
        {
            return Ok(Self::Q4_1 {
                data: t.data()?.into_owned(),
                n: dims[0],
                k: dims[1],
                candle: QMatMul::from_qtensor(t)?,
            });
        }
        Ok(Self::Candle(QMatMul::from_qtensor(t)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Q4_1 { candle, k, .. } if x.elem_count() / k < TILED_MIN_ROWS => {
                Ok(candle.forward(x)?)
            }
            Self::Q4_1 { data, n, k, .. } if x.dtype() == DType::F32 && x.device().is_cpu() => {
                let dims = x.dims().to_vec();
                let x = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let m = x.len() / k;
                let out = q4_1_matmul(data, *n, *k, &x, m);
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = *n;
                }
                Ok(Tensor::from_vec(out, out_dims, &candle_core::Device::Cpu)?)
            }
            Self::Q4_1 { .. } => Err(crate::HearthError::InvalidRequest(
                "Q4_1 weights need f32 activations on the CPU".into(),
            )),
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Candle's quantization of activation rows to Q8_1 blocks, as raw bytes.
fn quantize_rows(x: &[f32], m: usize, k: usize) -> Vec<u8> {
    let nb = k / QK;
    // SAFETY: all-zero bits are a valid BlockQ8_1 (f16 and i8 zeros); every block is overwritten below.
    let zero: BlockQ8_1 = unsafe { std::mem::zeroed() };
    let mut blocks = vec![zero; m * nb];
    for r in 0..m {
        BlockQ8_1::from_float(&x[r * k..(r + 1) * k], &mut blocks[r * nb..(r + 1) * nb]);
    }
    const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == Q8_1_BYTES);
    // SAFETY: BlockQ8_1 is repr(C), 36 bytes (d: f16, s: f16, qs: [i8; 32]) with no padding, as the
    // assertion above and candle's own assertion check; we only read the bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(blocks.as_ptr() as *const u8, blocks.len() * Q8_1_BYTES)
    };
    bytes.to_vec()
}

/// Eight activation rows' block `b`, decoded once: their scales, scaled sums and 8-bit values.
#[derive(Clone)]
#[repr(C, align(32))]
struct ActTile {
    d: [f32; ROW_TILE],
    s: [f32; ROW_TILE],
    qs: [[i8; QK]; ROW_TILE],
}

/// One weight block, decoded once: scale, minimum, and the 4-bit values as bytes (low nibbles then
/// high nibbles, matching the activation layout).
#[derive(Clone)]
#[repr(C, align(32))]
struct WeightBlock {
    qs: [u8; QK],
    d: f32,
    m: f32,
}

/// Activations as (tile, block) groups of eight rows; rows past `m` are zero and ignored.
fn decode_acts(xq: &[u8], m: usize, nb: usize) -> Vec<ActTile> {
    let tiles = m.div_ceil(ROW_TILE);
    let empty = ActTile {
        d: [0.0; ROW_TILE],
        s: [0.0; ROW_TILE],
        qs: [[0; QK]; ROW_TILE],
    };
    let mut out = vec![empty; tiles * nb];
    for r in 0..m {
        for b in 0..nb {
            let blk = &xq[(r * nb + b) * Q8_1_BYTES..][..Q8_1_BYTES];
            let t = &mut out[(r / ROW_TILE) * nb + b];
            let lane = r % ROW_TILE;
            t.d[lane] = f16_at(blk, 0);
            t.s[lane] = f16_at(blk, 2);
            for (q, &v) in t.qs[lane].iter_mut().zip(&blk[4..]) {
                *q = v as i8;
            }
        }
    }
    out
}

fn decode_weight(blk: &[u8]) -> WeightBlock {
    let mut qs = [0u8; QK];
    for j in 0..QK / 2 {
        qs[j] = blk[4 + j] & 0x0F;
        qs[j + QK / 2] = blk[4 + j] >> 4;
    }
    WeightBlock {
        qs,
        d: f16_at(blk, 0),
        m: f16_at(blk, 2),
    }
}

/// Accumulate one weight block against one tile of eight rows. Per row this is exactly candle's
/// `sumf += sumi as f32 * d_w * d_a + m_w * s_a` (no fused multiply-add, same order), eight rows at once.
#[inline(always)]
fn tile_step(acc: &mut [f32; ROW_TILE], w: &WeightBlock, a: &ActTile) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled at compile time (cfg above); every load/store touches exactly the
        // 32 bytes of a fixed-size array field.
        unsafe {
            let wq = _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i);
            let ones = _mm256_set1_epi16(1);
            let row = |r: usize| {
                let aq = _mm256_loadu_si256(a.qs[r].as_ptr() as *const __m256i);
                // u8 x i8 pairs to i16 (at most 2 * 15 * 127, no saturation), then pairs to i32.
                _mm256_madd_epi16(_mm256_maddubs_epi16(wq, aq), ones)
            };
            // Integer sums of eight rows into eight lanes (exact, so the order is free).
            let s01 = _mm256_hadd_epi32(row(0), row(1));
            let s23 = _mm256_hadd_epi32(row(2), row(3));
            let s45 = _mm256_hadd_epi32(row(4), row(5));
            let s67 = _mm256_hadd_epi32(row(6), row(7));
            let s0123 = _mm256_hadd_epi32(s01, s23);
            let s4567 = _mm256_hadd_epi32(s45, s67);
            let lo = _mm256_permute2x128_si256(s0123, s4567, 0x20);
            let hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
            let sumi = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
            let t = _mm256_mul_ps(
                _mm256_mul_ps(sumi, _mm256_set1_ps(w.d)),
                _mm256_loadu_ps(a.d.as_ptr()),
            );
            let u = _mm256_mul_ps(_mm256_set1_ps(w.m), _mm256_loadu_ps(a.s.as_ptr()));
            let sum = _mm256_add_ps(_mm256_loadu_ps(acc.as_ptr()), _mm256_add_ps(t, u));
            _mm256_storeu_ps(acc.as_mut_ptr(), sum);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        for (r, s) in acc.iter_mut().enumerate() {
            let sumi: i32 =
                w.qs.iter()
                    .zip(&a.qs[r])
                    .map(|(&x, &y)| x as i32 * y as i32)
                    .sum();
            *s += sumi as f32 * w.d * a.d[r] + w.m * a.s[r];
        }
    }
}

/// Output columns one parallel task computes.
const COL_CHUNK: usize = 16;

/// out (m, n) = x (m, k) . w (n, k)^T with w in Q4_1, bit-identical to candle's CPU result.
pub fn q4_1_matmul(w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let nb = k / QK;
    let tiles = m.div_ceil(ROW_TILE);
    let acts = decode_acts(&quantize_rows(x, m, k), m, nb);
    // Transposed, padded output (n, tiles * 8) so each task owns a contiguous run of columns.
    let mp = tiles * ROW_TILE;
    let mut out_t = vec![0f32; n * mp];
    out_t
        .par_chunks_mut(mp * COL_CHUNK)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let mut wblocks = Vec::with_capacity(nb);
            for (ci, dcol) in dst.chunks_mut(mp).enumerate() {
                let col = chunk * COL_CHUNK + ci;
                let wrow = &w[col * nb * Q4_1_BYTES..(col + 1) * nb * Q4_1_BYTES];
                wblocks.clear();
                wblocks.extend(wrow.chunks_exact(Q4_1_BYTES).map(decode_weight));
                for (t, dtile) in dcol.chunks_exact_mut(ROW_TILE).enumerate() {
                    let mut acc = [0f32; ROW_TILE];
                    for (wb, a) in wblocks.iter().zip(&acts[t * nb..(t + 1) * nb]) {
                        tile_step(&mut acc, wb, a);
                    }
                    dtile.copy_from_slice(&acc);
                }
            }
        });
    let mut out = vec![0f32; m * n];
    for (r, orow) in out.chunks_exact_mut(n).enumerate() {
        for (col, o) in orow.iter_mut().enumerate() {
            *o = out_t[col * mp + r];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn q4_1_matches_candle_bit_for_bit_at_every_batch_size() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (96, 256), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let reference =
            QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
        let ours = Linear::from_qtensor(q).unwrap();
        let Linear::Q4_1 { data, n, k, .. } = &ours else {
            panic!("Q4_1 weights must take the tiled kernel");
        };
        let x = Tensor::randn(0f32, 1.0, (37, 256), &dev).unwrap();
        let theirs = reference.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for m in [1usize, 3, 8, 37] {
            let xs = x
                .narrow(0, 0, m)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let tiled = q4_1_matmul(data, *n, *k, &xs, m);
            for r in 0..m {
                assert_eq!(
                    &tiled[r * n..(r + 1) * n],
                    theirs[r].as_slice(),
                    "m={m} row {r}"
                );
            }
        }
        let all = ours.forward(&x).unwrap();
        assert_eq!(all.to_vec2::<f32>().unwrap(), theirs);
        for r in [0usize, 5, 36] {
            let one = ours.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
            assert_eq!(
                one.to_vec2::<f32>().unwrap()[0],
                all.to_vec2::<f32>().unwrap()[r],
                "row {r} alone differs from row {r} in a batch"
            );
        }
    }
}
