//! Linear layers. On the CPU every quantized weight is multiplied by Hearth's own dispatch, never by
//! `QMatMul::forward`: candle 0.11 picks repacked kernels by CPUID at run time (AVX512-VNNI, AVX-VNNI
//! or AVX2 tiers, each with its own activation quantization and summation order) and, for Q6K, by
//! the number of rows (repacked from two rows on, per-row below). Through it, the same request gave
//! different logits on an AVX-512 machine than on an AVX2 one, and different logits alone than in a
//! batch. Here the per-row `k_quants::matmul` (SIMD chosen at compile time, one dot product per
//! output whatever the number of rows) is the reference, and `Linear::Cpu` adds kernels for Q4_1,
//! Q5_0 and Q8_0 (tiled: each weight block decoded once per tile of eight rows; lanes: eight output
//! columns at once, for one to seven rows) that compute every output with exactly that reference's
//! arithmetic, so results are bit-identical to it at any batch size and on any x86-64 CPU with AVX2.
//! They run on candle's barrier pool (`super::threads`).
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    self, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::{bf16, f16};

use super::threads::{pool, OutPtr};
use crate::error::{HearthError, Result};

const QK: usize = 32;
const Q4_1_BYTES: usize = 20;
const Q5_0_BYTES: usize = 22;
const Q8_0_BYTES: usize = 34;
const Q8_1_BYTES: usize = 36;
/// Activation rows that share one decoded weight block.
const ROW_TILE: usize = 8;
/// Which of Hearth's kernels takes `m` rows (benches/quant_matmul.rs): below a tile, Q4_1 and Q5_0
/// go eight columns at a time (`lane_matmul`: a partial tile of theirs costs a whole one), Q8_0
/// runs a partial tile (its per-row reference is vectorized within the row, which lanes over
/// columns cannot reproduce). Both beat candle's per-row kernels from one row on.
fn by_lanes(format: Format, m: usize) -> bool {
    m < ROW_TILE && format != Format::Q8_0
}

/// Weight formats the tiled kernel handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit unsigned with scale and minimum; activations in Q8_1.
    Q4_1,
    /// 5-bit signed with scale; activations in Q8_0.
    Q5_0,
    /// 8-bit signed with scale; activations in Q8_0. The per-row kernel is AVX2 already, but reads
    /// each weight block once per row; the tiled one reproduces its arithmetic lane for lane.
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

    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub enum Linear {
    /// A quantized (n, k) weight on the CPU, as stored in the file (shared with the embeddings when
    /// tied); `format` where Hearth's kernels take it, reading its blocks in place.
    Cpu {
        weight: Arc<QTensor>,
        n: usize,
        k: usize,
        format: Option<Format>,
    },
    /// Dense weights, and every weight on a GPU: candle's matmul.
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        Self::from_arc(Arc::new(t))
    }

    /// From a shared tensor (tied embeddings and output projection).
    pub fn from_arc(t: Arc<QTensor>) -> Result<Self> {
        let dims = t.shape().dims().to_vec();
        let on_cpu = t.device().is_cpu() && dims.len() == 2;
        if !on_cpu || !dims[1].is_multiple_of(t.dtype().block_size()) {
            return Ok(Self::Candle(QMatMul::from_arc(t)?));
        }
        let (n, k) = (dims[0], dims[1]);
        let format = Format::of(t.dtype()).filter(|_| k.is_multiple_of(QK));
        Ok(Self::Cpu {
            weight: t,
            n,
            k,
            format,
        })
    }

    /// Number of weights (n x k): multiply-accumulates per input row.
    pub fn weights(&self) -> u64 {
        let dims = match self {
            Self::Cpu { n, k, .. } => return (*n * *k) as u64,
            Self::Candle(QMatMul::QTensor(t)) => t.shape().dims().to_vec(),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims().to_vec(),
        };
        dims.iter().product::<usize>() as u64
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, n, k, format) = match self {
            Self::Candle(m) => return Ok(m.forward(x)?),
            Self::Cpu {
                weight,
                n,
                k,
                format,
            } => (weight, *n, *k, *format),
        };
        let in_dtype = x.dtype();
        let mut out_dims = x.dims().to_vec();
        let xs = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let m = xs.len() / k;
        let out = match format {
            Some(f) if !per_row_only() => {
                // A CPU tensor's bytes are borrowed, not copied.
                let raw = weight.data()?;
                if raw.len() != n * (k / QK) * f.block_bytes() {
                    return Err(HearthError::Internal(format!(
                        "{f:?} weight of {n}x{k} holds {} bytes",
                        raw.len()
                    )));
                }
                if by_lanes(f, m) {
                    lane_matmul(f, &raw, n, k, &xs, m)
                } else {
                    tiled_matmul(f, &raw, n, k, &xs, m)
                }
            }
            _ => row_matmul(weight, (m, k, n), &xs)?,
        };
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?.to_dtype(in_dtype)?)
    }
}

/// out (m, n) = x (m, k) . w (n, k)^T through candle's per-row `k_quants::matmul`: each output is
/// one dot product whose arithmetic depends only on the weight format and the compile-time target
/// features, not on m or on the CPU's run-time features.
pub fn row_matmul(w: &QTensor, mkn: (usize, usize, usize), x: &[f32]) -> Result<Vec<f32>> {
    fn run<T: GgmlType>(raw: &[u8], mkn: (usize, usize, usize), x: &[f32]) -> Result<Vec<f32>> {
        // SAFETY: the bytes are candle's own Vec<T> storage viewed as bytes (so aligned for T
        // unless the check below says otherwise), and T is a plain struct of integers and floats
        // for which every bit pattern is valid.
        let (pre, blocks, post) = unsafe { raw.align_to::<T>() };
        if !pre.is_empty() || !post.is_empty() {
            return Err(HearthError::Internal(format!(
                "{:?} weight storage is not block-aligned",
                T::DTYPE
            )));
        }
        let mut dst = vec![0f32; mkn.0 * mkn.2];
        k_quants::matmul(mkn, x, blocks, &mut dst)?;
        Ok(dst)
    }
    let raw = w.data()?;
    match w.dtype() {
        GgmlDType::F32 => run::<f32>(&raw, mkn, x),
        GgmlDType::F16 => run::<f16>(&raw, mkn, x),
        GgmlDType::BF16 => run::<bf16>(&raw, mkn, x),
        GgmlDType::Q4_0 => run::<BlockQ4_0>(&raw, mkn, x),
        GgmlDType::Q4_1 => run::<BlockQ4_1>(&raw, mkn, x),
        GgmlDType::Q5_0 => run::<BlockQ5_0>(&raw, mkn, x),
        GgmlDType::Q5_1 => run::<BlockQ5_1>(&raw, mkn, x),
        GgmlDType::Q8_0 => run::<BlockQ8_0>(&raw, mkn, x),
        GgmlDType::Q8_1 => run::<BlockQ8_1>(&raw, mkn, x),
        GgmlDType::Q2K => run::<BlockQ2K>(&raw, mkn, x),
        GgmlDType::Q3K => run::<BlockQ3K>(&raw, mkn, x),
        GgmlDType::Q4K => run::<BlockQ4K>(&raw, mkn, x),
        GgmlDType::Q5K => run::<BlockQ5K>(&raw, mkn, x),
        GgmlDType::Q6K => run::<BlockQ6K>(&raw, mkn, x),
        GgmlDType::Q8K => run::<BlockQ8K>(&raw, mkn, x),
    }
}

/// `HEARTH_CANDLE_KERNELS=1` turns the tiled kernels off, to measure them against the per-row ones.
fn per_row_only() -> bool {
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
#[repr(C, align(64))]
struct ActTile {
    d: [f32; ROW_TILE],
    s: [f32; ROW_TILE],
    qs: [[i8; QK]; ROW_TILE],
    /// Per row, -128 times the sum of each group of four values: the correction that turns VNNI's
    /// unsigned-by-signed dot product of `w + 128` back into the signed product `w . a`.
    neg128_sums: [[i32; ROW_TILE]; ROW_TILE],
}

/// Activations as (tile, block) groups of eight rows; rows past `m` are zero and ignored.
fn decode_acts(format: Format, xq: &[u8], m: usize, nb: usize) -> Vec<ActTile> {
    let tiles = m.div_ceil(ROW_TILE);
    let empty = ActTile {
        d: [0.0; ROW_TILE],
        s: [0.0; ROW_TILE],
        qs: [[0; QK]; ROW_TILE],
        neg128_sums: [[0; ROW_TILE]; ROW_TILE],
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
            for (sum, group) in t.neg128_sums[lane]
                .iter_mut()
                .zip(t.qs[lane].chunks_exact(4))
            {
                *sum = -128 * group.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
    }
    out
}

/// A weight format's blocks as the GGUF file stores them; the kernels read them in place (no
/// decoded copy: at one row a decoded Q4_1 block is twice the bytes to stream from memory).
trait Quant {
    const BYTES: usize;
    /// Signed values go to `maddubs` as |w|, with w's sign moved onto the activation.
    const SIGNED: bool;
    /// The block's 32 values in activation order (the low nibbles are values 0..16, the high ones
    /// 16..32), its scale, and its minimum (0 where the format has none). The portable kernels'
    /// decoding, and the definition the AVX2 `load` is tested against.
    #[cfg_attr(
        all(target_arch = "x86_64", target_feature = "avx2", not(test)),
        allow(dead_code)
    )]
    fn values(blk: &[u8]) -> ([i32; QK], f32, f32);
    /// `values` in a register, as bytes (unsigned for Q4_1, signed otherwise).
    ///
    /// # Safety
    /// `blk` holds at least `BYTES` bytes.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    unsafe fn load(blk: &[u8]) -> (std::arch::x86_64::__m256i, f32, f32);
}

/// 4-bit unsigned values, f16 scale and minimum.
struct Q41;
/// 5-bit values (4 in nibbles, the fifth bit of all 32 in one u32) minus 16, f16 scale.
struct Q50;
/// 8-bit signed values, f16 scale.
struct Q80;

impl Quant for Q41 {
    const BYTES: usize = Q4_1_BYTES;
    const SIGNED: bool = false;

    fn values(blk: &[u8]) -> ([i32; QK], f32, f32) {
        let mut v = [0i32; QK];
        for j in 0..QK / 2 {
            v[j] = (blk[4 + j] & 0x0F) as i32;
            v[j + QK / 2] = (blk[4 + j] >> 4) as i32;
        }
        (v, f16_at(blk, 0), f16_at(blk, 2))
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    #[inline(always)]
    unsafe fn load(blk: &[u8]) -> (std::arch::x86_64::__m256i, f32, f32) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 20 bytes; the load reads bytes 4..20.
        unsafe {
            let packed = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
            let low = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(packed, low);
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
            (_mm256_set_m128i(hi, lo), f16_at(blk, 0), f16_at(blk, 2))
        }
    }
}

impl Quant for Q50 {
    const BYTES: usize = Q5_0_BYTES;
    const SIGNED: bool = true;

    fn values(blk: &[u8]) -> ([i32; QK], f32, f32) {
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let mut v = [0i32; QK];
        for j in 0..QK / 2 {
            let lo = (blk[6 + j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
            let hi = (blk[6 + j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            v[j] = lo as i32 - 16;
            v[j + QK / 2] = hi as i32 - 16;
        }
        (v, f16_at(blk, 0), 0.0)
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    #[inline(always)]
    unsafe fn load(blk: &[u8]) -> (std::arch::x86_64::__m256i, f32, f32) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 22 bytes; the loads read bytes 2..6 and 6..22.
        unsafe {
            let packed = _mm_loadu_si128(blk.as_ptr().add(6) as *const __m128i);
            let low = _mm_set1_epi8(0x0F);
            let nibbles = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(packed, 4), low),
                _mm_and_si128(packed, low),
            );
            // Byte i of `set` is 0xFF where bit i of qh is set: spread qh's byte i / 8 to byte i,
            // then test bit i % 8.
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(qh as i32),
                _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0,
                ),
            );
            let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
            // value - 16 as a byte: the nibble when the fifth bit is set, nibble - 16 (the
            // nibble with 0xF0 above it) when not.
            let q = _mm256_or_si256(nibbles, _mm256_andnot_si256(set, _mm256_set1_epi8(-16)));
            (q, f16_at(blk, 0), 0.0)
        }
    }
}

impl Quant for Q80 {
    const BYTES: usize = Q8_0_BYTES;
    const SIGNED: bool = true;

    fn values(blk: &[u8]) -> ([i32; QK], f32, f32) {
        (
            std::array::from_fn(|j| blk[2 + j] as i8 as i32),
            f16_at(blk, 0),
            0.0,
        )
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    #[inline(always)]
    unsafe fn load(blk: &[u8]) -> (std::arch::x86_64::__m256i, f32, f32) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 34 bytes; the load reads bytes 2..34.
        unsafe {
            (
                _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i),
                f16_at(blk, 0),
                0.0,
            )
        }
    }
}

/// SIMD tier of the tiled kernels, picked once per process. Unlike candle's run-time tiers these
/// give the same bits on every tier: only the integer part of each dot product (exact, so its
/// evaluation order is free) changes; every float operation is the AVX2 reference's, lane for lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Avx2,
    /// AVX-512 with VNNI: two rows per 512-bit register, `vpdpbusd` for the byte dot products.
    Avx512Vnni,
}

/// The best tier this CPU runs; `HEARTH_CPU_TIER=avx2` pins the AVX2 one (to measure or compare).
pub fn cpu_tier() -> Tier {
    static TIER: std::sync::OnceLock<Tier> = std::sync::OnceLock::new();
    *TIER.get_or_init(|| {
        let pinned = std::env::var("HEARTH_CPU_TIER").is_ok_and(|v| v == "avx2");
        if !pinned && has_avx512_vnni() {
            Tier::Avx512Vnni
        } else {
            Tier::Avx2
        }
    })
}

fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Q8_0 for the first `rows` rows of one tile (a partial tile does only its own rows' work: at a
/// few rows, each weight block is still read once for all of them). `col`: one output column's
/// blocks as stored.
fn q8_0_tile(tier: Tier, col: &[u8], acts: &[ActTile], rows: usize) -> [f32; ROW_TILE] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if tier == Tier::Avx512Vnni {
        // SAFETY: `cpu_tier` (or a test that checked the same features) chose this tier only if
        // the CPU has AVX-512F, AVX-512BW and AVX-512 VNNI.
        return unsafe { q8_0_tile_avx512(col, acts, rows) };
    }
    let _ = tier;
    q8_0_tile_avx2(col, acts, rows)
}

/// The AVX-512 VNNI twin of `q8_0_tile_avx2`, bit for bit: rows 2p and 2p+1 share one register
/// (eight float lanes each, the same lanes as AVX2), `vpdpbusd` on `w + 128` plus the precomputed
/// `-128 * sum(a)` gives each lane the same exact integer as AVX2's `maddubs`/`madd` pair, and the
/// scale product, the fused multiply-add and the final horizontal sum are AVX2's per lane.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q8_0_tile_avx512(col: &[u8], acts: &[ActTile], rows: usize) -> [f32; ROW_TILE] {
    use std::arch::x86_64::*;
    const PAIRS: usize = ROW_TILE / 2;
    let mut acc = [_mm512_setzero_ps(); PAIRS];
    let flip = _mm512_set1_epi8(i8::MIN);
    // Lanes 0..8 take row 2p's scale, lanes 8..16 row 2p+1's.
    let spread: [__m512i; PAIRS] = std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
    });
    for (blk, a) in col.chunks_exact(Q80::BYTES).zip(acts) {
        // SAFETY: `blk` is a whole block; each other load reads exactly a fixed-size array field:
        // the 8 f32 scales, and two consecutive rows (64 bytes) of `qs` and of `neg128_sums`.
        unsafe {
            let (wq, wd, _) = Q80::load(blk);
            let wu = _mm512_xor_si512(_mm512_broadcast_i64x4(wq), flip);
            let d8 = _mm256_mul_ps(_mm256_set1_ps(wd), _mm256_loadu_ps(a.d.as_ptr()));
            let d16 = _mm512_castps256_ps512(d8);
            for (p, acc_p) in acc.iter_mut().enumerate().take(rows.div_ceil(2)) {
                let aq = _mm512_loadu_si512(a.qs[2 * p].as_ptr() as *const __m512i);
                let bias = _mm512_loadu_si512(a.neg128_sums[2 * p].as_ptr() as *const __m512i);
                let q = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(bias, wu, aq));
                let d = _mm512_permutexvar_ps(spread[p], d16);
                *acc_p = _mm512_fmadd_ps(d, q, *acc_p);
            }
        }
    }
    let mut out = [0f32; ROW_TILE];
    for (p, x) in acc.into_iter().enumerate() {
        out[2 * p] = hsum8(_mm512_castps512_ps256(x));
        out[2 * p + 1] = hsum8(_mm512_extractf32x8_ps::<1>(x));
    }
    out
}

/// candle's AVX2 `hsum_float_8`, the order every row's eight lanes are summed in.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn hsum8(x: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is enabled at compile time (cfg above); register operations only.
    unsafe {
        let res = _mm256_extractf128_ps(x, 1);
        let res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        let res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }
}

/// Q8_0 x Q8_0 for one tile: per row exactly candle's AVX2 `vec_dot_q8_0_q8_0` — eight float lanes
/// per row, `acc = fma(d_w * d_a, lanes, acc)` per block, and the same horizontal sum at the end.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn q8_0_tile_avx2(col: &[u8], acts: &[ActTile], rows: usize) -> [f32; ROW_TILE] {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); `blk` is a whole block, and
    // every other load reads exactly the 32 bytes of a fixed-size array field.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        let ones = _mm256_set1_epi16(1);
        for (blk, a) in col.chunks_exact(Q80::BYTES).zip(acts) {
            let (wq, wd, _) = Q80::load(blk);
            let wu = _mm256_sign_epi8(wq, wq);
            for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                let aq = _mm256_loadu_si256(a.qs[r].as_ptr() as *const __m256i);
                let sy = _mm256_sign_epi8(aq, wq);
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(wu, sy)));
                let d = _mm256_set1_ps(wd * a.d[r]);
                *acc_r = _mm256_fmadd_ps(d, q, *acc_r);
            }
        }
        acc.map(hsum8)
    }
}

/// Portable fallback (not bit-identical to candle's AVX2 path, which only exists with AVX2).
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn q8_0_tile_avx2(col: &[u8], acts: &[ActTile], rows: usize) -> [f32; ROW_TILE] {
    let mut out = [0f32; ROW_TILE];
    for (blk, a) in col.chunks_exact(Q80::BYTES).zip(acts) {
        let (w, d, _) = Q80::values(blk);
        for (r, o) in out.iter_mut().enumerate().take(rows) {
            let sumi: i32 = w.iter().zip(&a.qs[r]).map(|(&x, &y)| x * y as i32).sum();
            *o += sumi as f32 * d * a.d[r];
        }
    }
    out
}

/// One tile of eight rows against one output column of Q4_1 or Q5_0 blocks. Per row this is
/// exactly candle's `sumf += sumi as f32 * d_w * d_a + m_w * s_a` for Q4_1 and
/// `sumf += sumi as f32 * d_w * d_a` for Q5_0 (no fused multiply-add, same order), eight rows at once.
fn tile_sums<Q: Quant>(col: &[u8], acts: &[ActTile]) -> [f32; ROW_TILE] {
    let mut acc = [0f32; ROW_TILE];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled at compile time (cfg above); `blk` is a whole block, and every
        // other load/store touches exactly the 32 bytes of a fixed-size array field.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut sum = _mm256_setzero_ps();
            for (blk, a) in col.chunks_exact(Q::BYTES).zip(acts) {
                let (wq, wd, wm) = Q::load(blk);
                let wu = if Q::SIGNED {
                    _mm256_sign_epi8(wq, wq)
                } else {
                    wq
                };
                let row = |r: usize| {
                    let aq = _mm256_loadu_si256(a.qs[r].as_ptr() as *const __m256i);
                    let aq = if Q::SIGNED {
                        _mm256_sign_epi8(aq, wq)
                    } else {
                        aq
                    };
                    // u8 x i8 pairs to i16 (at most 2 * 16 * 127, no saturation), then to i32.
                    _mm256_madd_epi16(_mm256_maddubs_epi16(wu, aq), ones)
                };
                let sumi = hadd8([
                    row(0),
                    row(1),
                    row(2),
                    row(3),
                    row(4),
                    row(5),
                    row(6),
                    row(7),
                ]);
                let t = _mm256_mul_ps(
                    _mm256_mul_ps(sumi, _mm256_set1_ps(wd)),
                    _mm256_loadu_ps(a.d.as_ptr()),
                );
                let step = if Q::SIGNED {
                    t
                } else {
                    let u = _mm256_mul_ps(_mm256_set1_ps(wm), _mm256_loadu_ps(a.s.as_ptr()));
                    _mm256_add_ps(t, u)
                };
                sum = _mm256_add_ps(sum, step);
            }
            _mm256_storeu_ps(acc.as_mut_ptr(), sum);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    for (blk, a) in col.chunks_exact(Q::BYTES).zip(acts) {
        let (w, d, m) = Q::values(blk);
        for (r, s) in acc.iter_mut().enumerate() {
            let sumi: i32 = w.iter().zip(&a.qs[r]).map(|(&x, &y)| x * y as i32).sum();
            *s += if Q::SIGNED {
                sumi as f32 * d * a.d[r]
            } else {
                sumi as f32 * d * a.d[r] + m * a.s[r]
            };
        }
    }
    acc
}

/// Eight vectors of eight i32 into one of eight floats: lane i is the (exact) sum of vector i.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn hadd8(v: [std::arch::x86_64::__m256i; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is enabled at compile time (cfg above); register operations only.
    unsafe {
        let s01 = _mm256_hadd_epi32(v[0], v[1]);
        let s23 = _mm256_hadd_epi32(v[2], v[3]);
        let s45 = _mm256_hadd_epi32(v[4], v[5]);
        let s67 = _mm256_hadd_epi32(v[6], v[7]);
        let s0123 = _mm256_hadd_epi32(s01, s23);
        let s4567 = _mm256_hadd_epi32(s45, s67);
        let lo = _mm256_permute2x128_si256(s0123, s4567, 0x20);
        let hi = _mm256_permute2x128_si256(s0123, s4567, 0x31);
        _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi))
    }
}

/// Output columns one parallel task computes.
const COL_CHUNK: usize = 16;

/// What both kernels read: the weights as stored, one output column's blocks at a time, and the
/// activation rows quantized and grouped in tiles of eight.
struct Job<'a> {
    raw: &'a [u8],
    /// Blocks per column (k / 32).
    nb: usize,
    /// Bytes of one column's blocks.
    col_bytes: usize,
    acts: Vec<ActTile>,
}

impl<'a> Job<'a> {
    fn new(format: Format, raw: &'a [u8], k: usize, x: &[f32], m: usize) -> Self {
        let nb = k / QK;
        Self {
            raw,
            nb,
            col_bytes: nb * format.block_bytes(),
            acts: decode_acts(format, &quantize_rows(format, x, m, k), m, nb),
        }
    }

    /// Output column `c`'s weight blocks.
    fn col(&self, c: usize) -> &'a [u8] {
        &self.raw[c * self.col_bytes..(c + 1) * self.col_bytes]
    }

    /// Tile `t`'s activation blocks (rows 8t..8t+8).
    fn tile(&self, t: usize) -> &[ActTile] {
        &self.acts[t * self.nb..(t + 1) * self.nb]
    }
}

/// out (m, n) = x (m, k) . w (n, k)^T with w (`raw`, as stored) in `format`, bit-identical to
/// candle's CPU result.
pub fn tiled_matmul(
    format: Format,
    raw: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    tiled_matmul_on(cpu_tier(), format, raw, n, k, x, m)
}

/// `tiled_matmul` on a given tier (the caller checked that this CPU runs it).
fn tiled_matmul_on(
    tier: Tier,
    format: Format,
    raw: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let job = Job::new(format, raw, k, x, m);
    let mut out = vec![0f32; m * n];
    let dst = OutPtr::new(&mut out);
    pool().execute_chunked(n.div_ceil(COL_CHUNK), |chunks| {
        for c in chunks.start * COL_CHUNK..n.min(chunks.end * COL_CHUNK) {
            let col = job.col(c);
            for t in 0..m.div_ceil(ROW_TILE) {
                let tile_acts = job.tile(t);
                let vals = match format {
                    Format::Q8_0 => {
                        q8_0_tile(tier, col, tile_acts, (m - t * ROW_TILE).min(ROW_TILE))
                    }
                    Format::Q4_1 => tile_sums::<Q41>(col, tile_acts),
                    Format::Q5_0 => tile_sums::<Q50>(col, tile_acts),
                };
                for (lane, v) in vals.into_iter().enumerate().take(m - t * ROW_TILE) {
                    // SAFETY: row t * 8 + lane < m and c < n, so the index is inside `out`; each
                    // (row, column) is written by exactly one task (the one owning `c`), and `out`
                    // outlives the parallel loop.
                    unsafe { *dst.at((t * ROW_TILE + lane) * n + c) = v };
                }
            }
        }
    });
    out
}

/// Output columns one lane-kernel pass computes, one per f32 lane of an AVX2 register.
const COL_LANES: usize = 8;

/// out (m, n) = x (m, k) . w (n, k)^T for Q4_1 or Q5_0 weights (`raw`, as stored) and fewer rows
/// than a tile: eight output columns at a time, one per lane, so no lane is spent on a tile's empty
/// rows (at one row the tiled kernel would do eight times the work). Each lane is exactly the
/// per-row reference's dot product, block by block in order, so results are the same bits as
/// `tiled_matmul` and `row_matmul`.
pub fn lane_matmul(
    format: Format,
    raw: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let job = Job::new(format, raw, k, x, m);
    let mut out = vec![0f32; m * n];
    let dst = OutPtr::new(&mut out);
    pool().execute_chunked(n.div_ceil(COL_LANES), |range| {
        for g in range {
            // The last group repeats the last column in the lanes past `n` (never written).
            let cols: [&[u8]; COL_LANES] =
                std::array::from_fn(|j| job.col((g * COL_LANES + j).min(n - 1)));
            // Rows innermost: the group's weight blocks stay in L1 across the rows.
            for r in 0..m {
                let tile = job.tile(r / ROW_TILE);
                let vals = match format {
                    Format::Q5_0 => lane_sums::<Q50>(&cols, tile, r % ROW_TILE),
                    _ => lane_sums::<Q41>(&cols, tile, r % ROW_TILE),
                };
                for (j, v) in vals.into_iter().enumerate() {
                    let c = g * COL_LANES + j;
                    if c < n {
                        // SAFETY: r < m and c < n; each (row, column) belongs to exactly one task
                        // (the one owning group g), and `out` outlives the loop.
                        unsafe { *dst.at(r * n + c) = v };
                    }
                }
            }
        }
    });
    out
}

/// Eight columns' dot products with activation row `lane` of one tile: per lane
/// `sumf += sumi as f32 * d_w * d_a (+ m_w * s_a for Q4_1)`, block by block, as the reference.
#[inline(always)]
fn lane_sums<Q: Quant>(
    cols: &[&[u8]; COL_LANES],
    acts: &[ActTile],
    lane: usize,
) -> [f32; COL_LANES] {
    let mut out = [0f32; COL_LANES];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled at compile time (cfg above); each block slice is a whole block,
        // the activation load reads exactly a 32-byte array field, and the store writes `out`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = _mm256_setzero_ps();
            for (b, a) in acts.iter().enumerate() {
                let aq = _mm256_loadu_si256(a.qs[lane].as_ptr() as *const __m256i);
                let at = b * Q::BYTES;
                let mut d = [0f32; COL_LANES];
                let mut m = [0f32; COL_LANES];
                let sums: [__m256i; COL_LANES] = std::array::from_fn(|j| {
                    let (wq, wd, wm) = Q::load(&cols[j][at..at + Q::BYTES]);
                    d[j] = wd;
                    m[j] = wm;
                    let (wu, aq) = if Q::SIGNED {
                        (_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(aq, wq))
                    } else {
                        (wq, aq)
                    };
                    _mm256_madd_epi16(_mm256_maddubs_epi16(wu, aq), ones)
                });
                let sumi = hadd8(sums);
                let t = _mm256_mul_ps(
                    _mm256_mul_ps(sumi, _mm256_loadu_ps(d.as_ptr())),
                    _mm256_set1_ps(a.d[lane]),
                );
                let step = if Q::SIGNED {
                    t
                } else {
                    let u = _mm256_mul_ps(_mm256_loadu_ps(m.as_ptr()), _mm256_set1_ps(a.s[lane]));
                    _mm256_add_ps(t, u)
                };
                acc = _mm256_add_ps(acc, step);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    for (j, o) in out.iter_mut().enumerate() {
        for (blk, a) in cols[j].chunks_exact(Q::BYTES).zip(acts) {
            let (w, d, m) = Q::values(blk);
            let sumi: i32 = w.iter().zip(&a.qs[lane]).map(|(&x, &y)| x * y as i32).sum();
            *o += if Q::SIGNED {
                sumi as f32 * d * a.d[lane]
            } else {
                sumi as f32 * d * a.d[lane] + m * a.s[lane]
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(x: &Tensor, m: usize) -> Vec<f32> {
        x.narrow(0, 0, m)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Every tier this CPU can run (on a CPU without AVX-512 VNNI only AVX2 is checked here).
    fn tiers_here() -> Vec<Tier> {
        let mut tiers = vec![Tier::Avx2];
        if has_avx512_vnni() {
            tiers.push(Tier::Avx512Vnni);
        }
        tiers
    }

    #[test]
    fn tiled_kernels_match_the_per_row_reference_bit_for_bit_at_every_batch_size() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (99, 256), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let x = Tensor::randn(0f32, 1.0, (37, 256), &dev).unwrap();
            let reference = row_matmul(&q, (37, 256, 99), &rows(&x, 37)).unwrap();
            let ours = Linear::from_qtensor(q).unwrap();
            let Linear::Cpu {
                format: Some(format),
                weight,
                n,
                k,
            } = &ours
            else {
                panic!("{dtype:?} weights must take Hearth's kernels");
            };
            let blocks = &weight.data().unwrap();
            for tier in tiers_here() {
                for m in [1usize, 3, 8, 37] {
                    let tiled = tiled_matmul_on(tier, *format, blocks, *n, *k, &rows(&x, m), m);
                    for r in 0..m {
                        assert_eq!(
                            &tiled[r * n..(r + 1) * n],
                            &reference[r * n..(r + 1) * n],
                            "{dtype:?} {tier:?} m={m} row {r}"
                        );
                    }
                }
            }
            if *format != Format::Q8_0 {
                for m in 1..ROW_TILE {
                    let lanes = lane_matmul(*format, blocks, *n, *k, &rows(&x, m), m);
                    assert_eq!(lanes, reference[..m * n], "{dtype:?} lanes m={m}");
                }
            }
            let all = ours.forward(&x).unwrap().flatten_all().unwrap();
            assert_eq!(all.to_vec1::<f32>().unwrap(), reference, "{dtype:?}");
        }
    }

    /// The kernels unpack blocks in registers; every byte pattern must give the values the
    /// format's scalar definition gives.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    #[test]
    fn blocks_unpack_in_registers_as_the_scalar_definition() {
        fn check<Q: Quant>(seed: u64) {
            let mut x = seed;
            for _ in 0..500 {
                let blk: Vec<u8> = (0..Q::BYTES)
                    .map(|i| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Keep the f16 scale and minimum finite (bytes 0..4 where they are).
                        if i < 4 && i % 2 == 1 {
                            (x as u8) & 0x3B
                        } else {
                            x as u8
                        }
                    })
                    .collect();
                let (want, d, m) = Q::values(&blk);
                // SAFETY: `blk` is a whole block.
                let (got, gd, gm) = unsafe { Q::load(&blk) };
                let mut bytes = [0u8; QK];
                // SAFETY: 32 bytes into a 32-byte array.
                unsafe {
                    std::arch::x86_64::_mm256_storeu_si256(
                        bytes.as_mut_ptr() as *mut std::arch::x86_64::__m256i,
                        got,
                    )
                };
                let got: Vec<i32> = bytes
                    .iter()
                    .map(|&b| if Q::SIGNED { b as i8 as i32 } else { b as i32 })
                    .collect();
                assert_eq!(got, want);
                assert_eq!((gd.to_bits(), gm.to_bits()), (d.to_bits(), m.to_bits()));
            }
        }
        check::<Q41>(1);
        check::<Q50>(2);
        check::<Q80>(3);
    }

    /// Every quantized format gives each row the same bits whether it runs alone or with 36 others.
    /// Through `QMatMul::forward` this fails for Q6K on any x86-64 CPU (repacked kernels from two
    /// rows on) and for Q8_0 and Q4K on CPUs with AVX512-VNNI or AVX-VNNI.
    #[test]
    fn every_cpu_format_is_batch_invariant() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 512), &dev).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let w = Tensor::randn(0f32, 1.0, (64, 512), &dev).unwrap();
            let lin = Linear::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            assert!(matches!(lin, Linear::Cpu { .. }), "{dtype:?}");
            let batch = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for (r, row) in batch.iter().enumerate() {
                let alone = lin.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
                assert_eq!(
                    &alone.to_vec2::<f32>().unwrap()[0],
                    row,
                    "{dtype:?} row {r}"
                );
            }
        }
    }
}
