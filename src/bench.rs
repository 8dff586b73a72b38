//! `hearth bench`: prefill and decode throughput of one model through the real engine on this machine.
//! Prints a Markdown table (the format of benches/RESULTS.md).
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use clap::Args;

use crate::engine::{Engine, EngineConfig, EngineHandle, Event, Request, SamplingParams};
use crate::error::Result;
use crate::model::Model;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A GGUF file or a safetensors folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Tokens each sequence generates in the decode measurements.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Concurrent sequences for the aggregate decode measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub batches: Vec<usize>,
    /// Repetitions of each measurement; the best is reported.
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
}

/// A prompt of exactly `len` tokens, different per `seed`, of ordinary vocabulary ids.
fn synthetic_prompt(e: &EngineHandle, seed: usize, len: usize) -> Result<Vec<u32>> {
    let words = [
        "the", "river", "market", "seven", "lamp", "garden", "bright", "code", "winter",
    ];
    let mut text = String::new();
    let mut i = seed;
    while e.tokenizer.encode(&text)?.len() < len {
        i = i.wrapping_mul(31).wrapping_add(7);
        text.push_str(words[i % words.len()]);
        text.push(' ');
    }
    let ids = e.tokenizer.encode(&text)?;
    Ok(ids[..len].to_vec())
}

fn run_batch(e: &EngineHandle, prompts: &[Vec<u32>], max_tokens: usize) -> Result<(usize, f64)> {
    let params = SamplingParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let t0 = Instant::now();
    let rxs = prompts
        .iter()
        .map(|p| {
            e.submit(Request {
                tenant: None,
                prompt: p.clone(),
                params: params.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut tokens = 0;
    for rx in rxs {
        for ev in rx.iter() {
            match ev {
                Event::Token(_) => tokens += 1,
                Event::Finished { .. } => break,
                Event::Error(msg) => return Err(crate::HearthError::InvalidRequest(msg)),
            }
        }
    }
    Ok((tokens, t0.elapsed().as_secs_f64()))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let model = Model::load(&args.model, "bench", &Device::Cpu)?;
    let name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let engine = Engine::start(
        model,
        EngineConfig {
            kv_budget: crate::engine::KvBudget::Bytes(2 << 30),
            ..Default::default()
        },
    )?;
    let best = |f: &mut dyn FnMut() -> Result<f64>| -> Result<f64> {
        let mut b = 0f64;
        for _ in 0..args.repeat.max(1) {
            b = b.max(f()?);
        }
        Ok(b)
    };
    // Warm-up: first-touch of weights and caches.
    run_batch(&engine, &[synthetic_prompt(&engine, 99, 16)?], 4)?;

    let long = synthetic_prompt(&engine, 1, args.prefill_tokens)?;
    let prefill = best(&mut || {
        let (_, secs) = run_batch(&engine, std::slice::from_ref(&long), 1)?;
        Ok(args.prefill_tokens as f64 / secs)
    })?;

    // Single stream: time per generated token after the first (prefill excluded).
    let short = synthetic_prompt(&engine, 2, 16)?;
    let single = best(&mut || {
        let (_, t_first) = run_batch(&engine, std::slice::from_ref(&short), 1)?;
        let (n, t_all) = run_batch(&engine, std::slice::from_ref(&short), args.decode_tokens)?;
        Ok((n - 1) as f64 / (t_all - t_first))
    })?;

    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_default()
    });
    println!("| model | threads | measure | tok/s |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {name} | {threads} | prefill ({} tokens) | {prefill:.1} |",
        args.prefill_tokens
    );
    println!("| {name} | {threads} | decode, 1 stream | {single:.1} |");
    for &b in &args.batches {
        let prompts = (0..b)
            .map(|i| synthetic_prompt(&engine, 10 + i, 16))
            .collect::<Result<Vec<_>>>()?;
        // Aggregate: all generated tokens over wall time (16-token prompts make prefill negligible).
        let agg = best(&mut || {
            let (n, secs) = run_batch(&engine, &prompts, args.decode_tokens)?;
            Ok(n as f64 / secs)
        })?;
        println!("| {name} | {threads} | decode, {b} sequences (aggregate) | {agg:.1} |");
    }
    Ok(())
}
