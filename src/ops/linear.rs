//! Linear layers. On the CPU every quantized weight is multiplied by Hearth's own dispatch, never by
//! `QMatMul::forward`: candle 0.11 picks repacked kernels by CPUID at run time (AVX512-VNNI, AVX-VNNI
//! or AVX2 tiers, each with its own activation quantization and summation order) and, for Q6K, by
//! the number of rows (repacked from two rows on, per-row below). Through it, the same request gave
//! different logits on an AVX-512 machine than on an AVX2 one, and different logits alone than in a
//! batch. Here the per-row `k_quants::matmul` (SIMD chosen at compile time, one dot product per
//! output whatever the number of rows) is the reference; Q4_1, Q5_0 and Q8_0 weights are rearranged
//! into panels (`super::panels`) whose kernels compute every output with exactly that reference's
//! arithmetic, so results are bit-identical to it at any batch size and on any x86-64 CPU.
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    self, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1,
    BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use half::{bf16, f16};

use super::panels::{Format, Panels};
use crate::error::{HearthError, Result};

#[derive(Debug)]
pub enum Linear {
    /// A Q4_1, Q5_0 or Q8_0 weight on the CPU, in panels (shared with the embeddings when tied).
    Panels(Arc<Panels>),
    /// Another quantized (n, k) weight on the CPU, as stored in the file: candle's per-row kernels.
    Cpu {
        weight: Arc<QTensor>,
        n: usize,
        k: usize,
    },
    /// Dense weights, and every weight on a GPU: candle's matmul.
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        Self::from_arc(Arc::new(t))
    }

    /// From a shared tensor. A tensor that goes into panels is copied into them (its storage is
    /// freed with the last `Arc`, so a loader passes the only one).
    pub fn from_arc(t: Arc<QTensor>) -> Result<Self> {
        let dims = t.shape().dims().to_vec();
        let on_cpu = t.device().is_cpu() && dims.len() == 2;
        if !on_cpu || !dims[1].is_multiple_of(t.dtype().block_size()) {
            return Ok(Self::Candle(QMatMul::from_arc(t)?));
        }
        let (n, k) = (dims[0], dims[1]);
        match Format::of(t.dtype()) {
            Some(format) if !per_row_only() => Ok(Self::Panels(Arc::new(Panels::repack(
                format,
                &t.data()?,
                n,
                k,
            )?))),
            _ => Ok(Self::Cpu { weight: t, n, k }),
        }
    }

    /// Number of weights (n x k): multiply-accumulates per input row.
    pub fn weights(&self) -> u64 {
        let dims = match self {
            Self::Panels(p) => return (p.dims().0 * p.dims().1) as u64,
            Self::Cpu { n, k, .. } => return (*n * *k) as u64,
            Self::Candle(QMatMul::QTensor(t)) => t.shape().dims().to_vec(),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims().to_vec(),
        };
        dims.iter().product::<usize>() as u64
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Panels(p) => on_rows(x, p.dims().0, |xs| Ok(p.matmul(xs, xs.len() / p.dims().1))),
            Self::Cpu { weight, n, k } => {
                on_rows(x, *n, |xs| row_matmul(weight, (xs.len() / k, *k, *n), xs))
            }
        }
    }
}

/// `x`'s rows as f32 through `f` (the (m, n) product), back in `x`'s shape and dtype.
fn on_rows(x: &Tensor, n: usize, f: impl FnOnce(&[f32]) -> Result<Vec<f32>>) -> Result<Tensor> {
    let in_dtype = x.dtype();
    let mut out_dims = x.dims().to_vec();
    let xs = x
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let out = f(&xs)?;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?.to_dtype(in_dtype)?)
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

/// `HEARTH_CANDLE_KERNELS=1` keeps every weight in the file's layout on candle's per-row kernels, to
/// measure the panel kernels against them.
fn per_row_only() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("HEARTH_CANDLE_KERNELS").is_ok_and(|v| v == "1"))
}

#[cfg(test)]
mod tests {
    use super::super::panels::available_tiers;
    use super::*;

    const PANEL_FORMATS: [GgmlDType; 5] = [
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];

    fn rows(x: &Tensor, m: usize) -> Vec<f32> {
        x.narrow(0, 0, m)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Weights whose blocks span very different scales (so every value pattern shows up), with a
    /// partial last panel.
    fn weights(n: usize, k: usize) -> Tensor {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        // Blocks whose scales span e^-8..e^8, yet stay within f16: a scale beyond 65504 quantizes to
        // infinity and the product to NaN, which no comparison can match.
        let scale = Tensor::randn(0f32, 3.0, (n, k / 32, 1), &dev)
            .unwrap()
            .clamp(-8f32, 8f32)
            .unwrap()
            .exp()
            .unwrap()
            .broadcast_as((n, k / 32, 32))
            .unwrap()
            .reshape((n, k))
            .unwrap();
        (w * scale).unwrap()
    }

    #[test]
    fn panels_match_the_per_row_reference_bit_for_bit_at_every_batch_size_and_tier() {
        for dtype in PANEL_FORMATS {
            for (n, k) in [(99usize, 256usize), (40, 1024)] {
                let q = QTensor::quantize(&weights(n, k), dtype).unwrap();
                let x = (Tensor::randn(0f32, 1.0, (37, k), &Device::Cpu).unwrap() * 4.0).unwrap();
                let reference = row_matmul(&q, (37, k, n), &rows(&x, 37)).unwrap();
                let Linear::Panels(p) = Linear::from_qtensor(q).unwrap() else {
                    panic!("{dtype:?} weights must go into panels");
                };
                let tiers = available_tiers();
                // This machine kind has AVX-512 VNNI; every x86-64 build has AVX2.
                #[cfg(target_arch = "x86_64")]
                assert!(tiers.len() >= 2, "{tiers:?}");
                for tier in tiers {
                    for m in [1usize, 2, 3, 4, 5, 8, 37] {
                        let ours = p.matmul_on(tier, &rows(&x, m), m);
                        for r in 0..m {
                            assert_eq!(
                                &ours[r * n..(r + 1) * n],
                                &reference[r * n..(r + 1) * n],
                                "{dtype:?} {n}x{k} {tier:?} m={m} row {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A tied output projection's panels serve the embedding lookup: its rows must be candle's.
    #[test]
    fn panel_rows_dequantize_as_candle() {
        for dtype in PANEL_FORMATS {
            let q = QTensor::quantize(&weights(35, 512), dtype).unwrap();
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let Linear::Panels(p) = Linear::from_qtensor(q).unwrap() else {
                panic!("{dtype:?} weights must go into panels");
            };
            for (c, row) in want.iter().enumerate() {
                let mut got = vec![0f32; 512];
                p.dequantize_row(c, &mut got);
                // Bits, not floats: a block whose f16 scale overflowed dequantizes to NaN on both
                // sides, and NaN != NaN.
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(row), "{dtype:?} row {c}");
            }
        }
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
            assert!(!matches!(lin, Linear::Candle(_)), "{dtype:?}");
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
