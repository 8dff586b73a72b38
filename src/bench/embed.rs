//! `hearth bench --suite embed`: embeddings per second of an embedding model through its batcher
//! (the path `/v1/embeddings` takes), inputs of exactly `--embed-tokens` tokens: one request of
//! `b` inputs, and `b` concurrent one-input requests (the batching across requests), for each `b`
//! of `--batches`.
use std::time::Instant;

use super::{median, BenchArgs};
use crate::embedding::batcher::{BatchConfig, EmbedHandle};
use crate::embedding::Embedder;
use crate::error::{HearthError, Result};

/// An input of exactly `len` tokens ([CLS] ... [SEP]), different per `seed`.
fn synthetic_input(e: &Embedder, seed: usize, len: usize) -> Result<Vec<u32>> {
    let words = [
        "the", "river", "market", "seven", "lamp", "garden", "bright", "code", "winter", "invoice",
    ];
    let mut text = String::new();
    let mut i = seed;
    for _ in 0..len {
        i = i.wrapping_mul(31).wrapping_add(7);
        text.push_str(words[i % words.len()]);
        text.push(' ');
    }
    let mut ids = e.tokenize(&text)?;
    if ids.len() < len || len < 2 {
        return Err(HearthError::InvalidRequest(format!(
            "cannot make a {len}-token input (the model takes 2..={})",
            e.max_tokens()
        )));
    }
    let sep = ids[ids.len() - 1];
    ids.truncate(len - 1);
    ids.push(sep);
    Ok(ids)
}

pub fn suite(args: &BenchArgs) -> Result<()> {
    let path = args.model_path()?;
    let device = crate::device::select(args.device.as_deref())?;
    let embedder = Embedder::load(path, &device)?;
    let len = args.embed_tokens;
    let largest = args.batches.iter().copied().max().unwrap_or(1);
    let inputs = (0..largest)
        .map(|i| synthetic_input(&embedder, i, len))
        .collect::<Result<Vec<_>>>()?;
    let h = EmbedHandle::start(
        "bench",
        embedder,
        BatchConfig {
            max_batch_tokens: largest * len,
            max_waiting: largest + 1,
        },
    )?;
    h.embed_blocking(inputs[..1].to_vec(), "")?;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "| b inputs x {len} tokens | one request of b: embeddings/s | its ms | b requests of one: embeddings/s | their forwards |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for &b in &args.batches {
        let mut one = Vec::new();
        let mut many = Vec::new();
        let mut forwards = 0;
        for _ in 0..args.repeat.max(1) {
            let t0 = Instant::now();
            h.embed_blocking(inputs[..b].to_vec(), "")?;
            one.push(t0.elapsed().as_secs_f64());
            let before = h.stats().batches;
            let t0 = Instant::now();
            let rxs = inputs[..b]
                .iter()
                .map(|x| h.submit(vec![x.clone()], "".into()))
                .collect::<Result<Vec<_>>>()?;
            for rx in rxs {
                rx.blocking_recv()
                    .map_err(|_| HearthError::EngineStopped)??;
            }
            many.push(t0.elapsed().as_secs_f64());
            forwards = h.stats().batches - before;
        }
        let (one, many) = (median(&one), median(&many));
        println!(
            "| {b} | {:.1} | {:.1} | {:.1} | {forwards} |",
            b as f64 / one,
            one * 1e3,
            b as f64 / many
        );
    }
    println!(
        "\n{} on {device:?}, {threads} thread(s), median of {} runs",
        path.display(),
        args.repeat.max(1)
    );
    Ok(())
}
