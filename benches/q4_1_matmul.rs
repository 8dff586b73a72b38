//! Q4_1 matmul per-row cost, candle's kernel vs Hearth's tiled one, at several batch sizes.
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use hearth::ops::linear::Linear;
fn main() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (1536, 576), &dev).unwrap();
    let q = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
    let l = Linear::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
    for m in [1usize, 4, 16, 64, 256] {
        let x = Tensor::randn(0f32, 1.0, (m, 576), &dev).unwrap();
        let iters = 2000 / m + 5;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            let _ = q.forward(&x).unwrap();
        }
        let a = t.elapsed().as_secs_f64() / (iters * m) as f64 * 1e6;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            let _ = l.forward(&x).unwrap();
        }
        let b = t.elapsed().as_secs_f64() / (iters * m) as f64 * 1e6;
        println!("m={m}: candle {a:.1} us/row, hearth {b:.1} us/row");
    }
}
