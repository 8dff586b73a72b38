//! Quantized matmul cost per activation row: candle's `QMatMul` against Hearth's `Linear` (panel
//! kernels), per weight format and batch size, on a matrix that fits in cache (an MLP projection of
//! SmolLM2), one that does not (a slice of Gemma's output projection), and Gemma's K-quant shape.
//! `cargo bench --bench quant_matmul`; CANDLE_NUM_THREADS / RAYON_NUM_THREADS set the threads.
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hearth::ops::linear::Linear;

fn main() {
    let dev = Device::Cpu;
    let mut cases = vec![];
    for (n, k) in [(1536usize, 576usize), (32768, 640)] {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            cases.push((dtype, n, k));
        }
    }
    // Gemma 3 270M's K-quant layers: ffn_down (640 x 2048) and attn_output (640 x 1024).
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        cases.push((dtype, 640, 2048));
    }
    for (dtype, n, k) in cases {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let l = Linear::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let mut line = format!("{dtype:?} {n}x{k} us/row (candle/hearth):");
        for m in [1usize, 2, 4, 8, 16, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let iters = (20_000_000 / (n * k * m)).clamp(3, 2000);
            let time = |f: &dyn Fn() -> Tensor| {
                f();
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    f();
                }
                t.elapsed().as_secs_f64() / (iters * m) as f64 * 1e6
            };
            let a = time(&|| q.forward(&x).unwrap());
            let b = time(&|| l.forward(&x).unwrap());
            line += &format!(" m={m} {a:.0}/{b:.0}");
        }
        println!("{line}");
    }
}
