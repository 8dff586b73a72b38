//! GELU activations on the CPU, vectorized: Gemma's gated `gelu_tanh(gate) * up` (on the pool) and
//! BERT's exact (erf) form.
//!
//! candle computes `0.5 v (1 + tanh(u))` one element at a time through libm's `tanhf`; at 16
//! streams that was an eighth of Gemma's CPU time, on the calling thread while the pool spun. Here
//! `0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u))`, with `super::vexp`'s `exp`, whose AVX2 lanes and
//! scalar code give the same bits, so every element does whichever path or CPU computes it.
use candle_core::{DType, Device, Tensor};

use super::threads::{pool, OutPtr};
use super::vexp;
use crate::error::Result;

/// sqrt(2 / pi), times -2 (the exponent is -2u).
const NEG_2C: f32 = -2.0 * 0.797_884_6;
const K: f32 = 0.044_715;
/// Elements one pool task takes.
const CHUNK: usize = 4096;

/// gelu_tanh(v) * w for one element: the definition the vector path matches bit for bit.
fn scalar(v: f32, w: f32) -> f32 {
    let x = (NEG_2C * v) * K.mul_add(v * v, 1.0);
    v / (1.0 + vexp::exp(x)) * w
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn lanes(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = gate.len().min(up.len()).min(out.len()) / 8 * 8;
    // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); every load and store covers
    // 8 floats at i < n <= each slice's length.
    unsafe {
        let set = _mm256_set1_ps;
        for i in (0..n).step_by(8) {
            let v = _mm256_loadu_ps(gate.as_ptr().add(i));
            let w = _mm256_loadu_ps(up.as_ptr().add(i));
            let inner = _mm256_fmadd_ps(set(K), _mm256_mul_ps(v, v), set(1.0));
            let e = vexp::exp8(_mm256_mul_ps(_mm256_mul_ps(set(NEG_2C), v), inner));
            let g = _mm256_div_ps(v, _mm256_add_ps(set(1.0), e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(g, w));
        }
    }
    n
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn lanes(_: &[f32], _: &[f32], _: &mut [f32]) -> usize {
    0
}

/// out = gelu_tanh(gate) * up, elementwise.
pub fn gelu_mul_slices(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let done = lanes(gate, up, out);
    for ((o, &v), &w) in out[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
        *o = scalar(v, w);
    }
}

/// gelu_tanh(gate) * up for CPU tensors of one shape, in f32 on the pool.
pub fn gelu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let dtype = gate.dtype();
    let shape = gate.shape().clone();
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (g, u) = (flat(gate)?, flat(&up.broadcast_as(&shape)?)?);
    let mut out = vec![0f32; g.len()];
    let dst = OutPtr::new(&mut out);
    pool().execute_chunked(g.len().div_ceil(CHUNK), |range| {
        let (start, end) = (range.start * CHUNK, (range.end * CHUNK).min(g.len()));
        // SAFETY: each task owns elements start..end of `out` (disjoint chunk ranges), inside it,
        // and `out` outlives the parallel loop.
        let o = unsafe { dst.slice(start, end - start) };
        gelu_mul_slices(&g[start..end], &u[start..end], o);
    });
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Abramowitz and Stegun 7.1.26: erfc(z) = t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + P z)
/// for z >= 0, within 1.5e-7 (absolute). `ERF_A` is a5 first, in Horner's order.
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    1.061_405_4,
    -1.453_152,
    1.421_413_7,
    -0.284_496_72,
    0.254_829_6,
];

/// gelu(v) = v/2 (1 + erf(v / sqrt 2)) for one element: the definition the lanes match bit for
/// bit. Written with erfc(|v| / sqrt 2), so the negative side does not subtract nearly equal
/// numbers (1 + erf); its error stays within the approximation's 1.5e-7 times |v| / 2.
fn erf_scalar(v: f32) -> f32 {
    let z = v.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / ERF_P.mul_add(z, 1.0);
    let mut p = ERF_A[0];
    for a in &ERF_A[1..] {
        p = p.mul_add(t, *a);
    }
    let erfc = p * t * vexp::exp(-(z * z));
    let half = 0.5 * v;
    if v < 0.0 {
        half * erfc
    } else {
        half * (2.0 - erfc)
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn erf_lanes(x: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len() / 8 * 8;
    // SAFETY: AVX2 and FMA are enabled at compile time (cfg above); every load and store covers
    // 8 floats at i < n <= x.len().
    unsafe {
        let set = _mm256_set1_ps;
        for i in (0..n).step_by(8) {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            let z = _mm256_mul_ps(
                _mm256_andnot_ps(set(-0.0), v),
                set(std::f32::consts::FRAC_1_SQRT_2),
            );
            let t = _mm256_div_ps(set(1.0), _mm256_fmadd_ps(set(ERF_P), z, set(1.0)));
            let mut p = set(ERF_A[0]);
            for a in &ERF_A[1..] {
                p = _mm256_fmadd_ps(p, t, set(*a));
            }
            let e = vexp::exp8(_mm256_xor_ps(_mm256_mul_ps(z, z), set(-0.0)));
            let erfc = _mm256_mul_ps(_mm256_mul_ps(p, t), e);
            let half = _mm256_mul_ps(set(0.5), v);
            let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps());
            let factor = _mm256_blendv_ps(_mm256_sub_ps(set(2.0), erfc), erfc, negative);
            _mm256_storeu_ps(x.as_mut_ptr().add(i), _mm256_mul_ps(half, factor));
        }
    }
    n
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
fn erf_lanes(_: &mut [f32]) -> usize {
    0
}

/// BERT's exact GELU in place.
fn gelu_erf_slices(x: &mut [f32]) {
    let done = erf_lanes(x);
    for v in &mut x[done..] {
        *v = erf_scalar(*v);
    }
}

/// BERT's exact GELU in place, on the pool.
pub fn gelu_erf(x: &mut [f32]) {
    let len = x.len();
    let dst = OutPtr::new(x);
    pool().execute_chunked(len.div_ceil(CHUNK), |range| {
        let (start, end) = (range.start * CHUNK, (range.end * CHUNK).min(len));
        // SAFETY: each task owns elements start..end of `x` (disjoint chunk ranges), inside it,
        // and `x` outlives the parallel loop.
        gelu_erf_slices(unsafe { dst.slice(start, end - start) });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.0037).collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 200.0, -200.0, 1e30, -1e30,
        ]);
        xs.extend((0..1000).map(|i| ((i * 7919) % 2003) as f32 / 17.0 - 59.0));
        xs
    }

    #[test]
    fn vector_lanes_and_scalar_tail_give_the_same_bits() {
        let xs = inputs();
        let up: Vec<f32> = xs.iter().map(|x| 1.0 + x.sin()).collect();
        let mut out = vec![0f32; xs.len()];
        gelu_mul_slices(&xs, &up, &mut out);
        for (i, ((&v, &w), &o)) in xs.iter().zip(&up).zip(&out).enumerate() {
            assert_eq!(o.to_bits(), scalar(v, w).to_bits(), "element {i}: {v}");
        }
    }

    /// Within a few ulps of the definition in f64 (candle's f32 `1 + tanhf(u)` itself loses digits
    /// to cancellation for negative inputs, so f64 is the reference), and of candle's for v >= 0.
    #[test]
    fn matches_the_tanh_definition() {
        let xs = inputs();
        let gate = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let ones = Tensor::ones(xs.len(), DType::F32, &Device::Cpu).unwrap();
        let ours = gelu_mul(&gate, &ones).unwrap().to_vec1::<f32>().unwrap();
        let candle = gate.gelu().unwrap().to_vec1::<f32>().unwrap();
        for ((&v, &a), &c) in xs.iter().zip(&ours).zip(&candle) {
            let x = v as f64;
            // 0.5 x (1 + tanh(u)) without the cancellation: x / (1 + exp(-2u)).
            let u = (2.0 / std::f64::consts::PI).sqrt() * x * (1.0 + 0.044715 * x * x);
            let want = x / (1.0 + (-2.0 * u).exp());
            // exp(-2u) carries the f32 rounding of its argument (a few ulps of 2u, times 2u); past the
            // clamp (exp(87)) both results are below |x| * 2e-38.
            let ulps = 4.0 + 8.0 * u.abs();
            let tol = ulps * f32::EPSILON as f64 * want.abs() + x.abs() * 2e-38;
            assert!((a as f64 - want).abs() <= tol, "gelu({v}): {a} vs {want}");
            if v >= 0.0 {
                assert!(
                    (a - c).abs() <= 4.0 * f32::EPSILON * c.abs(),
                    "gelu({v}): {a} vs candle's {c}"
                );
            }
        }
    }

    #[test]
    fn erf_lanes_and_scalar_tail_give_the_same_bits() {
        let xs = inputs();
        let mut out = xs.clone();
        gelu_erf_slices(&mut out);
        for (i, (&v, &o)) in xs.iter().zip(&out).enumerate() {
            assert_eq!(o.to_bits(), erf_scalar(v).to_bits(), "element {i}: {v}");
        }
    }

    /// Within 2e-7 |v| of the exact definition in f64 (the approximation's 1.5e-7 on erf, halved,
    /// plus f32 rounding), and of candle's `gelu_erf`.
    #[test]
    fn matches_the_erf_definition() {
        let xs: Vec<f32> = inputs().into_iter().filter(|v| v.abs() < 1e6).collect();
        let mut ours = xs.clone();
        gelu_erf(&mut ours);
        let candle = Tensor::new(xs.as_slice(), &Device::Cpu)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // candle's erf in f64 (a port of statrs', within a few ulps of f64) as the exact value.
        let exact = Tensor::new(xs.as_slice(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (((&v, &a), &c), &want) in xs.iter().zip(&ours).zip(&candle).zip(&exact) {
            let tol = 2e-7 * (v as f64).abs() + 2.0 * f32::EPSILON as f64 * want.abs();
            assert!(
                (a as f64 - want).abs() <= tol,
                "gelu_erf({v}): {a} vs {want}"
            );
            let tol_c = tol + 2.0 * f32::EPSILON as f64 * (c as f64).abs();
            assert!(
                (a as f64 - c as f64).abs() <= tol_c,
                "gelu_erf({v}): {a} vs candle's {c}"
            );
        }
    }
}
