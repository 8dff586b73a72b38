//! Linear layers. Candle's CPU matmul for Q4_1 and Q5_0 weights has no SIMD kernel and decodes every
//! weight block once per activation row, so batching rows gains nothing. `Linear::Tiled` decodes each
//! weight block once per tile of eight rows and runs the integer dot products with AVX2. Each output is
//! computed with exactly candle's arithmetic (8-bit activations from candle's own quantizer, the same
//! per-block float expression in the same order), so results are bit-identical to candle's and do not
//! depend on how many rows share the call.
use candle_core::quantized::k_quants::{BlockQ8_0, BlockQ8_1, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;

const QK: usize = 32;
const Q4_1_BYTES: usize = 20;
const Q5_0_BYTES: usize = 22;
const Q8_0_BYTES: usize = 34;
const Q8_1_BYTES: usize = 36;
/// Activation rows that share one decoded weight block.
const ROW_TILE: usize = 8;
/// From this many rows on, the tiled kernel beats candle's (benches/q4_1_matmul.rs, hearth bench):
/// candle's Q4_1/Q5_0 kernels are scalar, so two rows suffice; its Q8_0 kernel is AVX2 already, so
/// the tiled one only wins once a whole tile of rows shares each weight block.
fn tiled_min_rows(format: Format) -> usize {
    match format {
        Format::Q4_1 | Format::Q5_0 => 2,
        Format::Q8_0 => ROW_TILE,
    }
}

/// Weight formats the tiled kernel handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit unsigned with scale and minimum; activations in Q8_1.
    Q4_1,
    /// 5-bit signed with scale; activations in Q8_0.
    Q5_0,
    /// 8-bit signed with scale; activations in Q8_0. Candle has an AVX2 kernel for it, but one that
    /// reads each weight block once per row; the tiled one reproduces its arithmetic lane for lane.
    Q8_0,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BYTES,
            Self::Q5_0 => Q5_0_BYTES,
            Self::Q8_0 => Q8_0_BYTES,
        }
    }
}

#[derive(Debug)]
pub enum Linear {
    /// (n, k) weight blocks as stored in the file. Below `tiled_min_rows` rows candle's own kernel is
    /// as fast (and gives the same bits), so it is kept too.
    Tiled {
        format: Format,
        /// Weight blocks decoded once at load, (n, k / 32) in row order.
        blocks: Vec<WeightBlock>,
        n: usize,
        k: usize,
        candle: QMatMul,
    },
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        Self::from_arc(std::sync::Arc::new(t))
    }

    /// From a shared tensor (tied embeddings and output projection).
    pub fn from_arc(t: std::sync::Arc<QTensor>) -> Result<Self> {
        let dims = t.shape().dims().to_vec();
        let format = match t.dtype() {
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q5_0 => Some(Format::Q5_0),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        };
        if let (Some(format), true) = (
            format,
            t.device().is_cpu() && dims.len() == 2 && dims[1].is_multiple_of(QK),
        ) {
            let raw = t.data()?;
            let blocks = raw
                .par_chunks_exact(format.block_bytes())
                .map(|b| decode_weight(format, b))
                .collect();
            return Ok(Self::Tiled {
                format,
                blocks,
                n: dims[0],
                k: dims[1],
                candle: QMatMul::from_arc(t)?,
            });
        }
        Ok(Self::Candle(QMatMul::from_arc(t)?))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Tiled {
                candle, k, format, ..
            } if x.elem_count() / k < tiled_min_rows(*format)
                || candle_only()
                || x.dtype() != DType::F32
                || !x.device().is_cpu() =>
            {
                Ok(candle.forward(x)?)
            }
            Self::Tiled {
                format,
                blocks,
                n,
                k,
                ..
            } => {
                let dims = x.dims().to_vec();
                let x = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let m = x.len() / k;
                let out = tiled_matmul(*format, blocks, *n, *k, &x, m);
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = *n;
                }
                Ok(Tensor::from_vec(out, out_dims, &candle_core::Device::Cpu)?)
            }
        }
    }
}

/// `HEARTH_CANDLE_KERNELS=1` turns the tiled kernel off, to measure it against candle's.
fn candle_only() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("HEARTH_CANDLE_KERNELS").is_ok_and(|v| v == "1"))
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Candle's quantization of activation rows (Q8_1 for Q4_1 weights, Q8_0 for Q5_0), as raw bytes.
fn quantize_rows(format: Format, x: &[f32], m: usize, k: usize) -> Vec<u8> {
    fn quantize<B: GgmlType + Clone>(x: &[f32], m: usize, k: usize, bytes: usize) -> Vec<u8> {
        let nb = k / QK;
        assert_eq!(std::mem::size_of::<B>(), bytes);
        // SAFETY: all-zero bits are a valid Q8_0/Q8_1 block (f16 and i8 zeros); every block is
        // overwritten below.
        let zero: B = unsafe { std::mem::zeroed() };
        let mut blocks = vec![zero; m * nb];
        for r in 0..m {
            B::from_float(&x[r * k..(r + 1) * k], &mut blocks[r * nb..(r + 1) * nb]);
        }
        // SAFETY: the blocks are repr(C) structs of f16 and i8 fields with no padding (the size
        // assertion above and candle's own assertions check it); we only read their bytes.
        let raw = unsafe {
            std::slice::from_raw_parts(blocks.as_ptr() as *const u8, blocks.len() * bytes)
        };
        raw.to_vec()
    }
    match format {
        Format::Q4_1 => quantize::<BlockQ8_1>(x, m, k, Q8_1_BYTES),
        Format::Q5_0 | Format::Q8_0 => quantize::<BlockQ8_0>(x, m, k, Q8_0_BYTES),
    }
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
#[derive(Debug, Clone)]
pub struct WeightBlock {
    qs: [u8; QK],
    d: f32,
    m: f32,
}

/// Activations as (tile, block) groups of eight rows; rows past `m` are zero and ignored.
fn decode_acts(format: Format, xq: &[u8], m: usize, nb: usize) -> Vec<ActTile> {
    let tiles = m.div_ceil(ROW_TILE);
    let empty = ActTile {
        d: [0.0; ROW_TILE],
        s: [0.0; ROW_TILE],
        qs: [[0; QK]; ROW_TILE],
    };
    let (bytes, qs_at) = match format {
        Format::Q4_1 => (Q8_1_BYTES, 4),
        Format::Q5_0 | Format::Q8_0 => (Q8_0_BYTES, 2),
    };
    let mut out = vec![empty; tiles * nb];
    for r in 0..m {
        for b in 0..nb {
            let blk = &xq[(r * nb + b) * bytes..][..bytes];
            let t = &mut out[(r / ROW_TILE) * nb + b];
            let lane = r % ROW_TILE;
            t.d[lane] = f16_at(blk, 0);
            if format == Format::Q4_1 {
                t.s[lane] = f16_at(blk, 2);
            }
            for (q, &v) in t.qs[lane].iter_mut().zip(&blk[qs_at..]) {
                *q = v as i8;
            }
        }
    }
    out
}

fn decode_weight(format: Format, blk: &[u8]) -> WeightBlock {
    let mut qs = [0u8; QK];
    match format {
        Format::Q4_1 => {
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
        Format::Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            for j in 0..QK / 2 {
                let lo = (blk[6 + j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                let hi = (blk[6 + j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                // Stored as the signed value's byte (-16..15).
                qs[j] = (lo as i8 - 16) as u8;
                qs[j + QK / 2] = (hi as i8 - 16) as u8;
            }
            WeightBlock {
                qs,
                d: f16_at(blk, 0),
                m: 0.0,
            }
        }
        Format::Q8_0 => {
            qs.copy_from_slice(&blk[2..2 + QK]);
            WeightBlock {
                qs,
                d: f16_at(blk, 0),
                m: 0.0,
            }
        }
    }
}

/// Q8_0 x Q8_0 for one tile: per row exactly candle's AVX2 `vec_dot_q8_0_q8_0` — eight float lanes
/// per row, `acc = fma(d_w * d_a, lanes, acc)` per block, and the same horizontal sum at the end.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn q8_0_tile(wblocks: &[WeightBlock], acts: &[ActTile]) -> [f32; ROW_TILE] {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); every load reads exactly the
    // 32 bytes of a fixed-size array field.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        let ones = _mm256_set1_epi16(1);
        for (w, a) in wblocks.iter().zip(acts) {
            let wq = _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i);
            let wu = _mm256_sign_epi8(wq, wq);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let aq = _mm256_loadu_si256(a.qs[r].as_ptr() as *const __m256i);
                let sy = _mm256_sign_epi8(aq, wq);
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(wu, sy)));
                let d = _mm256_set1_ps(w.d * a.d[r]);
                *acc_r = _mm256_fmadd_ps(d, q, *acc_r);
            }
        }
        let mut out = [0f32; ROW_TILE];
        for (o, x) in out.iter_mut().zip(acc) {
            let res = _mm256_extractf128_ps(x, 1);
            let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
            let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
            let res = _mm_add_ss(res, _mm_movehdup_ps(res));
            *o = _mm_cvtss_f32(res);
        }
        out
    }
}

/// Portable fallback (not bit-identical to candle's AVX2 path, which only exists with AVX2).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn q8_0_tile(wblocks: &[WeightBlock], acts: &[ActTile]) -> [f32; ROW_TILE] {
    let mut out = [0f32; ROW_TILE];
    for (w, a) in wblocks.iter().zip(acts) {
        for (r, o) in out.iter_mut().enumerate() {
            let sumi: i32 =
                w.qs.iter()
                    .zip(&a.qs[r])
                    .map(|(&x, &y)| x as i8 as i32 * y as i32)
                    .sum();
            *o += sumi as f32 * w.d * a.d[r];
        }
    }
    out
}

/// Accumulate one weight block against one tile of eight rows. Per row this is exactly candle's
/// `sumf += sumi as f32 * d_w * d_a + m_w * s_a` for Q4_1 and `sumf += sumi as f32 * d_w * d_a` for
/// Q5_0 (no fused multiply-add, same order), eight rows at once.
#[inline(always)]
fn tile_step<const SIGNED: bool>(acc: &mut [f32; ROW_TILE], w: &WeightBlock, a: &ActTile) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled at compile time (cfg above); every load/store touches exactly the
        // 32 bytes of a fixed-size array field.
        unsafe {
            let wq = _mm256_loadu_si256(w.qs.as_ptr() as *const __m256i);
            // maddubs wants an unsigned left side: for signed weights use |w| and move w's sign to a.
            let wu = if SIGNED { _mm256_sign_epi8(wq, wq) } else { wq };
            let ones = _mm256_set1_epi16(1);
            let row = |r: usize| {
                let aq = _mm256_loadu_si256(a.qs[r].as_ptr() as *const __m256i);
                let aq = if SIGNED { _mm256_sign_epi8(aq, wq) } else { aq };
                // u8 x i8 pairs to i16 (at most 2 * 16 * 127, no saturation), then pairs to i32.
                _mm256_madd_epi16(_mm256_maddubs_epi16(wu, aq), ones)
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
            let step = if SIGNED {
                t
            } else {
                let u = _mm256_mul_ps(_mm256_set1_ps(w.m), _mm256_loadu_ps(a.s.as_ptr()));
                _mm256_add_ps(t, u)
            };
            let sum = _mm256_add_ps(_mm256_loadu_ps(acc.as_ptr()), step);
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

/// out (m, n) = x (m, k) . w (n, k)^T with w in `format`, bit-identical to candle's CPU result.
pub fn tiled_matmul(
    format: Format,
    w: &[WeightBlock],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let nb = k / QK;
    let tiles = m.div_ceil(ROW_TILE);
    let acts = decode_acts(format, &quantize_rows(format, x, m, k), m, nb);
    // Transposed, padded output (n, tiles * 8) so each task owns a contiguous run of columns.
    let mp = tiles * ROW_TILE;
    let mut out_t = vec![0f32; n * mp];
    out_t
        .par_chunks_mut(mp * COL_CHUNK)
        .enumerate()
        .for_each(|(chunk, dst)| {
            for (ci, dcol) in dst.chunks_mut(mp).enumerate() {
                let col = chunk * COL_CHUNK + ci;
                let wblocks = &w[col * nb..(col + 1) * nb];
                for (t, dtile) in dcol.chunks_exact_mut(ROW_TILE).enumerate() {
                    if format == Format::Q8_0 {
                        dtile.copy_from_slice(&q8_0_tile(wblocks, &acts[t * nb..(t + 1) * nb]));
                        continue;
                    }
                    let mut acc = [0f32; ROW_TILE];
                    for (wblk, a) in wblocks.iter().zip(&acts[t * nb..(t + 1) * nb]) {
                        match format {
                            Format::Q4_1 => tile_step::<false>(&mut acc, wblk, a),
                            Format::Q5_0 | Format::Q8_0 => tile_step::<true>(&mut acc, wblk, a),
                        }
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
    fn tiled_kernels_match_candle_bit_for_bit_at_every_batch_size() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (96, 256), &dev).unwrap();
            let reference = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let ours = Linear::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let Linear::Tiled {
                format,
                blocks,
                n,
                k,
                ..
            } = &ours
            else {
                panic!("{dtype:?} weights must take the tiled kernel");
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
                let tiled = tiled_matmul(*format, blocks, *n, *k, &xs, m);
                for r in 0..m {
                    assert_eq!(
                        &tiled[r * n..(r + 1) * n],
                        theirs[r].as_slice(),
                        "{dtype:?} m={m} row {r}"
                    );
                }
            }
            let all = ours.forward(&x).unwrap();
            assert_eq!(all.to_vec2::<f32>().unwrap(), theirs, "{dtype:?}");
        }
    }
}
