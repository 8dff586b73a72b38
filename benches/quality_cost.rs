//! What the per-token quality signals add to the greedy pick (cargo bench --bench quality_cost):
//! `greedy::pick` (argmax, normalizer, entropy, runner-up) against `greedy::argmax_lse` (argmax
//! and normalizer only) on logit rows of SmolLM2's and Gemma 3's vocabulary sizes, interleaved.
use std::time::Instant;

use hearth::ops::greedy;

fn main() {
    for vocab in [49_152usize, 262_144] {
        let row: Vec<f32> = (0..vocab)
            .map(|i| ((i.wrapping_mul(2_654_435_761) % 10_007) as f32 / 700.0) - 7.0)
            .collect();
        let reps = if vocab > 100_000 { 400 } else { 2000 };
        let (mut old, mut new) = (Vec::new(), Vec::new());
        let mut sink = 0f32;
        for _ in 0..15 {
            let t = Instant::now();
            for _ in 0..reps {
                sink += greedy::argmax_lse(std::hint::black_box(&row)).1;
            }
            old.push(t.elapsed().as_secs_f64() / reps as f64);
            let t = Instant::now();
            for _ in 0..reps {
                sink += greedy::pick(std::hint::black_box(&row)).entropy;
            }
            new.push(t.elapsed().as_secs_f64() / reps as f64);
        }
        old.sort_by(f64::total_cmp);
        new.sort_by(f64::total_cmp);
        let (o, n) = (old[old.len() / 2], new[new.len() / 2]);
        println!(
            "vocab {vocab}: argmax + normalizer {:.1} us, with entropy and runner-up {:.1} us (+{:.1} us, x{:.2}) (checksum {})",
            o * 1e6,
            n * 1e6,
            (n - o) * 1e6,
            n / o,
            sink.is_finite()
        );
    }
}
