//! Quantized weights rearranged for Hearth's CPU kernels (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), and their
//! matmul.
//!
//! A GGUF file stores each output column's blocks one after another, so a kernel that reads it in
//! place computes one column per dot product: at one activation row its float accumulators form one
//! chain per column, and a 512-bit register holds at most two columns. Here the columns go in panels
//! of 16: per block, each group of four values of all 16 columns lies side by side (64 bytes), so one
//! `vpdpbusd` (or `vpmaddubsw`) takes a group of 16 columns against the activation's four bytes
//! broadcast, and each lane then holds exactly the integer that candle's AVX2 reference
//! (`vec_dot_q8_0_q8_0`, `vec_dot_q4k_q8k`, `vec_dot_q6k_q8k`, and the exact per-block sums of its
//! Q4_1 and Q5_0 dot products) has in that lane for that column. The float work is the reference's,
//! lane for lane, so every output is the same bits as `row_matmul`'s at any batch size, on every
//! tier (AVX-512 VNNI, AVX2, portable).
//!
//! The values are the file's, rearranged (the weights are not kept twice): f16 scales as stored;
//! Q8_0 values offset by 128 to unsigned (VNNI multiplies unsigned by signed bytes; the activation
//! side carries the `-128 * sum` correction); Q4_1, Q5_0 and Q4_K nibbles two to a byte as in the
//! file, with Q5_0's fifth bits as one 64-bit mask per group; Q4_K's 6-bit scales and minimums one
//! byte each and Q6_K's values one byte each (4% and 22% more bytes than the file for those two).
use candle_core::quantized::GgmlDType;
use half::f16;

use super::threads::{pool, OutPtr};
use crate::error::{HearthError, Result};

mod portable;
mod q8;
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod x86;

/// Output columns per panel: one per 32-bit lane of a 512-bit register.
pub const PANEL: usize = 16;
/// Activation rows one pass over a panel takes (unpacked weights are reused across them).
const ROWS: usize = 4;
/// Four-value groups per 32-value block.
const GROUPS: usize = 8;
/// Four-value groups per 256-value super-block (Q4_K, Q6_K).
const KGROUPS: usize = 64;

/// Weight formats with panel kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit unsigned with f16 scale and minimum; activations in Q8_1.
    Q4_1,
    /// 5-bit signed (value - 16) with f16 scale; activations in Q8_0.
    Q5_0,
    /// 8-bit signed with f16 scale; activations in Q8_0.
    Q8_0,
    /// 256-value super-blocks of eight 4-bit sub-blocks, 6-bit scales and minimums; activations Q8_K.
    Q4K,
    /// 256-value super-blocks of 6-bit values (minus 32), sixteen 8-bit scales; activations Q8_K.
    Q6K,
}

impl Format {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// Values per block.
    pub fn block(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes of one column's block in the file.
    fn file_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Value bytes of one panel block: a byte per value (Q8_0, Q6_K) or two nibbles per byte.
    fn vals(self) -> usize {
        self.block() * PANEL / if self.nibbles() { 2 } else { 1 }
    }

    fn nibbles(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_0 | Self::Q4K)
    }

    /// The rest of a panel block, per column: its f16 scale, then Q4_1's f16 minimum, Q5_0's
    /// fifth bits (eight 64-bit masks for the panel), Q4_K's f16 minimum scale and eight 6-bit
    /// scales and minimums (a byte each), or Q6_K's sixteen 8-bit scales.
    fn meta(self) -> usize {
        PANEL
            * match self {
                Self::Q8_0 => 2,
                Self::Q4_1 => 4,
                Self::Q5_0 => 2 + 4,
                Self::Q4K => 4 + 16,
                Self::Q6K => 2 + 16,
            }
    }
}

/// SIMD tier of the kernels, picked once per process. Every tier gives the same bits: only the
/// integer part of each dot product (exact, so its evaluation order is free) differs between them;
/// every float operation is the AVX2 reference's, lane for lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Scalar code with the reference's float operations (`f32::mul_add` for its fused ones).
    Portable,
    Avx2,
    /// AVX-512 with VNNI: sixteen columns per register, `vpdpbusd` / `vpdpwssd` for the sums.
    Avx512Vnni,
}

/// Whether this build has the AVX2 tier (compile-time features, as candle's reference kernels).
const AVX2: bool = cfg!(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
));

/// The best tier this CPU runs; `HEARTH_CPU_TIER=avx2` (or `portable`) pins a lower one, to measure
/// or compare.
pub fn cpu_tier() -> Tier {
    static TIER: std::sync::OnceLock<Tier> = std::sync::OnceLock::new();
    *TIER.get_or_init(|| {
        let pinned = std::env::var("HEARTH_CPU_TIER").unwrap_or_default();
        let best = available_tiers().pop().unwrap_or(Tier::Portable);
        match pinned.as_str() {
            "portable" => Tier::Portable,
            "avx2" if AVX2 => Tier::Avx2,
            _ => best,
        }
    })
}

/// Every tier this CPU runs, lowest first.
pub fn available_tiers() -> Vec<Tier> {
    let mut tiers = vec![Tier::Portable];
    if AVX2 {
        tiers.push(Tier::Avx2);
        if has_avx512_vnni() {
            tiers.push(Tier::Avx512Vnni);
        }
    }
    tiers
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

/// 64 bytes, so the panels start on cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// An (n, k) quantized weight in panels of 16 output columns. Panel p holds its blocks' values,
/// then their scales (minimums, masks); a last partial panel has zero columns past `n`.
pub struct Panels {
    format: Format,
    n: usize,
    k: usize,
    data: Vec<Line>,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Panels({:?}, {}x{})", self.format, self.n, self.k)
    }
}

/// One column's block of the file, decoded: values as the kernels store them (unsigned, offsets
/// included), and the block's scale bytes in the panel's order.
struct Decoded {
    vals: Vec<u8>,
    /// f16 scale (and Q4_1's minimum, Q4_K's minimum scale) as stored.
    halves: Vec<[u8; 2]>,
    /// Q4_K: eight scales then eight minimums; Q6_K: sixteen scales; Q5_0: the fifth bits as 0/1.
    bytes: Vec<u8>,
}

fn decode(format: Format, blk: &[u8]) -> Decoded {
    let half = |at: usize| [blk[at], blk[at + 1]];
    match format {
        Format::Q8_0 => Decoded {
            vals: blk[2..].iter().map(|&q| q ^ 0x80).collect(),
            halves: vec![half(0)],
            bytes: vec![],
        },
        Format::Q4_1 | Format::Q5_0 => {
            let qs = &blk[format.file_bytes() - 16..];
            let mut vals: Vec<u8> = qs.iter().map(|&q| q & 0x0F).collect();
            vals.extend(qs.iter().map(|&q| q >> 4));
            if format == Format::Q4_1 {
                Decoded {
                    vals,
                    halves: vec![half(0), half(2)],
                    bytes: vec![],
                }
            } else {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                Decoded {
                    vals,
                    halves: vec![half(0)],
                    bytes: (0..32).map(|v| ((qh >> v) & 1) as u8).collect(),
                }
            }
        }
        Format::Q4K => {
            let (sc, qs) = (&blk[4..16], &blk[16..144]);
            let scale_min = |j: usize| {
                if j < 4 {
                    (sc[j] & 63, sc[j + 4] & 63)
                } else {
                    (
                        (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4),
                        (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                    )
                }
            };
            // Sub-blocks 2j and 2j + 1 are the low and high nibbles of bytes 32j..32j + 32.
            let vals = (0..256)
                .map(|v| {
                    let q = qs[32 * (v / 64) + v % 32];
                    if (v / 32) % 2 == 0 {
                        q & 0x0F
                    } else {
                        q >> 4
                    }
                })
                .collect();
            let mut bytes: Vec<u8> = (0..8).map(|j| scale_min(j).0).collect();
            bytes.extend((0..8).map(|j| scale_min(j).1));
            Decoded {
                vals,
                halves: vec![half(0), half(2)],
                bytes,
            }
        }
        Format::Q6K => {
            let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
            let vals = (0..256)
                .map(|v| {
                    let (h, c, l) = (v / 128, (v % 128) / 32, v % 32);
                    let low = ql[64 * h + 32 * (c % 2) + l];
                    let low = if c < 2 { low & 0x0F } else { low >> 4 };
                    low | ((qh[32 * h + l] >> (2 * c)) & 3) << 4
                })
                .collect();
            Decoded {
                vals,
                halves: vec![half(208)],
                bytes: sc.to_vec(),
            }
        }
    }
}

impl Panels {
    /// Rearranges an (n, k) weight stored as the file's blocks (`raw`).
    pub fn repack(format: Format, raw: &[u8], n: usize, k: usize) -> Result<Self> {
        let fb = format.file_bytes();
        if !k.is_multiple_of(format.block()) || raw.len() != n * (k / format.block()) * fb {
            return Err(HearthError::Internal(format!(
                "{format:?} weight of {n}x{k} holds {} bytes",
                raw.len()
            )));
        }
        let mut panels = Self {
            format,
            n,
            k,
            data: Vec::new(),
        };
        panels.data = vec![Line([0; 64]); (n.div_ceil(PANEL) * panels.stride()).div_ceil(64)];
        let nb = panels.blocks();
        for c in 0..n {
            let (p, l) = (c / PANEL, c % PANEL);
            for b in 0..nb {
                let d = decode(format, &raw[(c * nb + b) * fb..][..fb]);
                let (vals, meta) = panels.block_at(p, b);
                let data = panels.bytes_mut();
                // Value v is byte v % 4 of group v / 4; nibble formats put the block's second
                // half in the high nibbles of the first half's bytes.
                let half = if format.nibbles() {
                    d.vals.len() / 2
                } else {
                    d.vals.len()
                };
                for (v, &q) in d.vals.iter().enumerate() {
                    let (v, shift) = (v % half, if v < half { 0 } else { 4 });
                    data[vals + (v / 4) * 64 + 4 * l + v % 4] |= q << shift;
                }
                for (i, h) in d.halves.iter().enumerate() {
                    data[meta + 2 * PANEL * i + 2 * l..][..2].copy_from_slice(h);
                }
                let at = meta + 2 * PANEL * d.halves.len();
                match format {
                    Format::Q5_0 => {
                        // Mask g has value 4g + i's fifth bit at bit 4l + i.
                        for (v, &bit) in d.bytes.iter().enumerate() {
                            let pos = 4 * l + v % 4;
                            data[at + 8 * (v / 4) + pos / 8] |= bit << (pos % 8);
                        }
                    }
                    _ => {
                        for (j, &s) in d.bytes.iter().enumerate() {
                            data[at + PANEL * j + l] = s;
                        }
                    }
                }
            }
        }
        Ok(panels)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// (n, k): output columns, inputs.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn blocks(&self) -> usize {
        self.k / self.format.block()
    }

    /// Bytes of one panel.
    fn stride(&self) -> usize {
        self.blocks() * (self.format.vals() + self.format.meta())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding (repr(C), size 64).
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.data.len() * 64) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.as_mut_ptr() as *mut u8, self.data.len() * 64)
        }
    }

    /// Byte offsets of panel p's block b: its values and its scales (minimums, masks).
    fn block_at(&self, p: usize, b: usize) -> (usize, usize) {
        let (f, nb) = (self.format, self.blocks());
        let at = p * self.stride();
        (at + b * f.vals(), at + nb * f.vals() + b * f.meta())
    }

    /// Panel p's values and scales regions.
    fn panel(&self, p: usize) -> (&[u8], &[u8]) {
        let (f, nb) = (self.format, self.blocks());
        let at = p * self.stride();
        let bytes = self.bytes();
        (
            &bytes[at..at + nb * f.vals()],
            &bytes[at + nb * f.vals()..at + self.stride()],
        )
    }

    /// Row `c` of the weight as floats, exactly as candle's `to_float` gives it (the embedding
    /// lookup of a tied output projection).
    pub fn dequantize_row(&self, c: usize, out: &mut [f32]) {
        let (f, l) = (self.format, c % PANEL);
        let bytes = self.bytes();
        for (b, ys) in out.chunks_exact_mut(f.block()).enumerate() {
            let (vals, meta) = self.block_at(c / PANEL, b);
            let half = |i: usize| f16_at(bytes, meta + 2 * PANEL * i + 2 * l);
            let value = |v: usize| {
                let n = if f.nibbles() {
                    f.block() / 2
                } else {
                    f.block()
                };
                let q = bytes[vals + ((v % n) / 4) * 64 + 4 * l + v % 4];
                if v < n {
                    q & if f.nibbles() { 0x0F } else { 0xFF }
                } else {
                    q >> 4
                }
            };
            let byte = |at: usize, j: usize| bytes[meta + at + PANEL * j + l];
            match f {
                Format::Q8_0 => {
                    for (v, y) in ys.iter_mut().enumerate() {
                        *y = ((value(v) ^ 0x80) as i8) as f32 * half(0);
                    }
                }
                Format::Q4_1 => {
                    for (v, y) in ys.iter_mut().enumerate() {
                        *y = value(v) as f32 * half(0) + half(1);
                    }
                }
                Format::Q5_0 => {
                    for (v, y) in ys.iter_mut().enumerate() {
                        let pos = 4 * l + v % 4;
                        let fifth =
                            (bytes[meta + 2 * PANEL + 8 * (v / 4) + pos / 8] >> (pos % 8)) & 1;
                        *y = ((value(v) | fifth << 4) as i32 - 16) as f32 * half(0);
                    }
                }
                Format::Q4K => {
                    let (d, min) = (half(0), half(1));
                    for (v, y) in ys.iter_mut().enumerate() {
                        let sb = v / 32;
                        let (sc, m) = (byte(4 * PANEL, sb), byte(4 * PANEL, 8 + sb));
                        *y = d * sc as f32 * value(v) as f32 - min * m as f32;
                    }
                }
                Format::Q6K => {
                    let d = half(0);
                    for (v, y) in ys.iter_mut().enumerate() {
                        let sc = byte(2 * PANEL, v / 16) as i8;
                        *y = d * sc as f32 * (value(v) as i8 - 32) as f32;
                    }
                }
            }
        }
    }

    /// out (m, n) = x (m, k) . w (n, k)^T, bit-identical to candle's per-row AVX2 result.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_on(cpu_tier(), x, m)
    }

    /// `matmul` on a given tier (the caller checked that this CPU runs it).
    pub fn matmul_on(&self, tier: Tier, x: &[f32], m: usize) -> Vec<f32> {
        let f = self.format;
        match f {
            Format::Q4K | Format::Q6K => {
                let acts = kacts(f, &x[..m * self.k]);
                self.run(&acts, m, |t| kernel_k(tier, f, t))
            }
            _ => {
                let acts = acts(f, &x[..m * self.k]);
                self.run(&acts, m, |t| kernel_32(tier, f, t))
            }
        }
    }

    /// Every panel against every group of up to `ROWS` rows, on the pool.
    fn run<A: Sync>(
        &self,
        acts: &[A],
        m: usize,
        kernel: impl Fn(Tile<A>) -> [[f32; PANEL]; ROWS] + Sync,
    ) -> Vec<f32> {
        let (n, nb) = (self.n, self.blocks());
        let mut out = vec![0f32; m * n];
        let dst = OutPtr::new(&mut out);
        pool().execute_chunked(n.div_ceil(PANEL), |range| {
            for p in range {
                let (vals, meta) = self.panel(p);
                let cols = (n - p * PANEL).min(PANEL);
                for r0 in (0..m).step_by(ROWS) {
                    let rows = (m - r0).min(ROWS);
                    // Rows past `rows` repeat the last one (never computed, never written).
                    let row_acts: [&[A]; ROWS] =
                        std::array::from_fn(|i| &acts[(r0 + i.min(rows - 1)) * nb..][..nb]);
                    let res = kernel(Tile {
                        vals,
                        meta,
                        acts: &row_acts,
                        rows,
                    });
                    for (i, res_row) in res.iter().enumerate().take(rows) {
                        // SAFETY: row r0 + i < m, and the `cols` columns from p * 16 are < n; each
                        // (row, column) is written by exactly the task that owns panel p, and `out`
                        // outlives the parallel loop.
                        let row = unsafe { dst.slice((r0 + i) * n + p * PANEL, cols) };
                        row.copy_from_slice(&res_row[..cols]);
                    }
                }
            }
        });
        out
    }
}

/// One panel (its values and scales regions) and the activation rows one kernel call takes: the
/// first `rows` of `acts` (the rest repeat the last, never written).
#[derive(Clone, Copy)]
struct Tile<'a, A> {
    vals: &'a [u8],
    meta: &'a [u8],
    acts: &'a [&'a [A]; ROWS],
    rows: usize,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// One activation row's 32-value block, quantized as the reference quantizes it (Q8_1 for Q4_1
/// weights, Q8_0 otherwise).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Acts {
    /// Four signed bytes per group, as one i32 to broadcast.
    qs: [i32; GROUPS],
    /// Q8_0: per group, -128 times the group's sum (the weights are stored + 128). Q5_0: in [0],
    /// -16 times the block's sum (stored + 16). Q4_1: zero (its values are unsigned already).
    bias: [i32; GROUPS],
    d: f32,
    /// Q8_1's scaled sum (Q4_1 only).
    s: f32,
}

/// One activation row's 256-value super-block in Q8_K.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct KActs {
    qs: [i32; KGROUPS],
    /// Q6_K: per group, 32 (a0 + a1) and 32 (a2 + a3) as two i16: the reference's `maddubs(32, a)`
    /// that takes the values' offset of 32 back out.
    corr: [i32; KGROUPS],
    /// Q4_K: the 32-value sub-blocks' sums in pairs (S[2i], S[2i + 1]) as two i16, for the
    /// minimums' `madd`.
    sums: [i32; 4],
    d: f32,
}

/// Values below which activations are quantized on the calling thread (waking the pool costs more).
const PAR_QUANTIZE: usize = 8192;

/// candle's quantization of `x` into `block`s (each block on its own, so any split gives the same
/// bytes), each block's bytes turned into a kernel record by `build`; on the pool for large inputs.
fn quantize<A: Clone + Send>(
    x: &[f32],
    block: q8::Block,
    zero: A,
    build: impl Fn(&[u8]) -> A + Sync,
) -> Vec<A> {
    let (bs, bytes) = (block.values, block.bytes);
    let count = x.len() / bs;
    let blocks = |from: usize, out: &mut [A]| {
        let mut raw = [0u8; q8::MAX_BYTES];
        for (i, o) in out.iter_mut().enumerate() {
            (block.quantize)(&x[(from + i) * bs..][..bs], &mut raw);
            *o = build(&raw[..bytes]);
        }
    };
    let mut out = vec![zero; count];
    if x.len() < PAR_QUANTIZE {
        blocks(0, &mut out);
    } else {
        let dst = OutPtr::new(&mut out);
        pool().execute_chunked(count, |range| {
            // SAFETY: each task owns its block range of `out`, inside it; `out` outlives the loop.
            let o = unsafe { dst.slice(range.start, range.len()) };
            blocks(range.start, o);
        });
    }
    out
}

fn word(bytes: [u8; 4]) -> i32 {
    i32::from_le_bytes(bytes)
}

fn i16_pair(lo: i32, hi: i32) -> i32 {
    (lo as i16 as u16 as u32 | (hi as i16 as u16 as u32) << 16) as i32
}

fn acts(format: Format, x: &[f32]) -> Vec<Acts> {
    let zero = Acts {
        qs: [0; GROUPS],
        bias: [0; GROUPS],
        d: 0.0,
        s: 0.0,
    };
    let build = |blk: &[u8]| {
        let qs = &blk[blk.len() - 32..];
        let sum = |g: usize| {
            qs[4 * g..4 * g + 4]
                .iter()
                .map(|&v| v as i8 as i32)
                .sum::<i32>()
        };
        let mut bias = [0i32; GROUPS];
        match format {
            Format::Q8_0 => bias = std::array::from_fn(|g| -128 * sum(g)),
            Format::Q5_0 => bias[0] = -16 * (0..GROUPS).map(sum).sum::<i32>(),
            _ => {}
        }
        Acts {
            qs: std::array::from_fn(|g| {
                word([qs[4 * g], qs[4 * g + 1], qs[4 * g + 2], qs[4 * g + 3]])
            }),
            bias,
            d: f16_at(blk, 0),
            // Q8_1 (36 bytes) carries the scaled sum after the scale.
            s: if blk.len() == 36 { f16_at(blk, 2) } else { 0.0 },
        }
    };
    match format {
        Format::Q4_1 => quantize(x, q8::Q8_1, zero, build),
        _ => quantize(x, q8::Q8_0, zero, build),
    }
}

fn kacts(format: Format, x: &[f32]) -> Vec<KActs> {
    let zero = KActs {
        qs: [0; KGROUPS],
        corr: [0; KGROUPS],
        sums: [0; 4],
        d: 0.0,
    };
    quantize(x, q8::Q8K, zero, |blk| {
        let qs = &blk[4..260];
        let a = |v: usize| qs[v] as i8 as i32;
        let bsum = |i: usize| i16::from_le_bytes([blk[260 + 2 * i], blk[261 + 2 * i]]);
        // The reference adds pairs of 16-value sums with `hadd_epi16` (wrapping i16).
        let sub = |s: usize| bsum(2 * s).wrapping_add(bsum(2 * s + 1)) as i32;
        KActs {
            qs: std::array::from_fn(|g| {
                word([qs[4 * g], qs[4 * g + 1], qs[4 * g + 2], qs[4 * g + 3]])
            }),
            corr: if format == Format::Q6K {
                std::array::from_fn(|g| {
                    i16_pair(
                        32 * (a(4 * g) + a(4 * g + 1)),
                        32 * (a(4 * g + 2) + a(4 * g + 3)),
                    )
                })
            } else {
                [0; KGROUPS]
            },
            sums: std::array::from_fn(|i| i16_pair(sub(2 * i), sub(2 * i + 1))),
            d: f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
        }
    })
}

/// candle's AVX2 `hsum_float_8` order over a column's eight lane accumulators:
/// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
fn hsum_order(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// One panel against up to `ROWS` rows of 32-value blocks, on `tier`.
fn kernel_32(tier: Tier, f: Format, t: Tile<Acts>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    if tier != Tier::Portable {
        return x86::kernel_32(tier, f, t);
    }
    let _ = tier;
    match f {
        Format::Q8_0 => std::array::from_fn(|i| {
            if i < rows {
                portable::q8_0(vals, meta, acts[i])
            } else {
                [0.0; PANEL]
            }
        }),
        f => portable::nibbles(f, t),
    }
}

/// One panel against up to `ROWS` rows of 256-value super-blocks, on `tier`.
fn kernel_k(tier: Tier, f: Format, t: Tile<KActs>) -> [[f32; PANEL]; ROWS] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    if tier != Tier::Portable {
        return x86::kernel_k(tier, f, t);
    }
    let _ = tier;
    portable::k(f, t)
}
