//! `hearth bench`: prefill and decode throughput of one model through the real engine on this machine
//! (suites `core`, `prefix`), the router's cost / quality table over served models (`route`), or
//! any OpenAI-compatible server under streaming load (`serve`). Prints Markdown tables (the format
//! of benches/RESULTS.md).
pub mod cache;
pub mod cost;
pub mod embed;
pub mod route;
pub mod serve;

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::engine::{Engine, EngineConfig, EngineHandle, Event, Request, SamplingParams};
use crate::error::Result;
use crate::model::Model;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A GGUF file or a safetensors folder (the `core` and `prefix` suites); the served model's
    /// name (`serve`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `serve`: the servers to load, `URL` or `LABEL=URL` (repeat, or separate with commas).
    #[arg(long, value_delimiter = ',')]
    pub url: Vec<String>,
    /// `serve`: concurrent streams at each level.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub levels: Vec<usize>,
    /// `serve`: requests per level.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// `serve`: tokens each request generates (at most; exactly with --ignore-eos).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// `serve`: about this many prompt tokens per request.
    #[arg(long, default_value_t = 200)]
    pub prompt_tokens: usize,
    /// `serve`: ask the server to generate past end-of-sequence (`ignore_eos`).
    #[arg(long)]
    pub ignore_eos: bool,
    /// `serve`: an API key sent as `Authorization: Bearer`.
    #[arg(long, env = "HEARTH_API_KEY")]
    pub api_key: Option<String>,
    /// `serve`: write the results as JSON here; `cache`: each pair's similarity and the guard's
    /// verdict, as JSON lines.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// `serve`: earlier results (`--json` files) to show beside this run's, in the table and chart
    /// (e.g. another model, or another server measured on its own).
    #[arg(long)]
    pub from: Vec<PathBuf>,
    /// `serve`: draw tok/s and TTFT against concurrency, one line per server, as SVG here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// `embed`: tokens of each input ([CLS] and [SEP] included).
    #[arg(long, default_value_t = 128)]
    pub embed_tokens: usize,
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
    /// `core`: prefill and decode throughput; `prefix`: the prefix cache's effect; `route`: the
    /// router against always-small and always-large on `--data`; `embed`: an embedding model's
    /// embeddings per second (`--model` its folder, `--batches`, `--embed-tokens`).
    #[arg(long, default_value = "core")]
    pub suite: String,
    /// The data set (JSON lines): `route`, prompts with checkable answers (default
    /// benches/route_set.jsonl); `cache`, labelled question pairs (default
    /// benches/cache_pairs.jsonl).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `cache`: answers held in one tenant for the index measurement; 0 measures the labelled
    /// pairs only (no index, no miss overhead).
    #[arg(long, default_value_t = 100_000)]
    pub entries: usize,
    /// `cache`: the threshold at which the pairs are listed by kind, with their false hits and
    /// refused paraphrases (default: the cache's default for the embedder, `default_threshold`).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// `cache`: a low-rank adapter merged into the embedding model (`questions`, the built-in
    /// one, or a safetensors file).
    #[arg(long)]
    pub adapter: Option<String>,
    /// The `route` suite's server config (models and routes); default: the default models.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// cuda:N, metal, cpu (default: the best available).
    #[arg(long)]
    pub device: Option<String>,
    /// portable, cpu or cuda (default: the fastest for the device).
    #[arg(long)]
    pub attention: Option<String>,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 2048)]
    pub kv_cache_mib: usize,
}

impl BenchArgs {
    /// `--data`, or the suite's default.
    fn data_or(&self, default: &str) -> PathBuf {
        self.data.clone().unwrap_or_else(|| default.into())
    }

    fn model_path(&self) -> Result<&PathBuf> {
        self.model.as_ref().ok_or_else(|| {
            crate::HearthError::InvalidRequest(format!("the {} suite needs --model", self.suite))
        })
    }

    fn engine(&self, caching: bool) -> Result<EngineHandle> {
        let device = crate::device::select(self.device.as_deref())?;
        Engine::start(
            Model::load(self.model_path()?, "bench", &device)?,
            EngineConfig {
                kv_budget: crate::engine::KvBudget::Bytes(self.kv_cache_mib << 20),
                prefix_caching: caching,
                backend: self
                    .attention
                    .as_deref()
                    .map(crate::model::AttentionBackend::parse)
                    .transpose()?,
                ..Default::default()
            },
        )
    }
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

/// Seconds until the first token of one request.
fn ttft(e: &EngineHandle, prompt: &[u32]) -> Result<f64> {
    let t0 = Instant::now();
    let rx = e.submit(Request::new(
        prompt.to_vec(),
        SamplingParams {
            max_tokens: Some(1),
            ..SamplingParams::greedy()
        },
    ))?;
    for ev in rx.iter() {
        match ev {
            Event::Token(_) => {
                let secs = t0.elapsed().as_secs_f64();
                for _ in rx.iter() {}
                return Ok(secs);
            }
            Event::Error(msg) => return Err(crate::HearthError::InvalidRequest(msg)),
            _ => {}
        }
    }
    Err(crate::HearthError::EngineStopped)
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
        .map(|p| e.submit(Request::new(p.clone(), params.clone())))
        .collect::<Result<Vec<_>>>()?;
    let mut tokens = 0;
    for rx in rxs {
        for ev in rx.iter() {
            match ev {
                Event::Admitted { .. } | Event::Prefilled { .. } => {}
                Event::Token(_) => tokens += 1,
                Event::Finished { .. } => break,
                Event::Error(msg) => return Err(crate::HearthError::InvalidRequest(msg)),
            }
        }
    }
    Ok((tokens, t0.elapsed().as_secs_f64()))
}

fn prefix_suite(args: &BenchArgs, name: &str) -> Result<()> {
    let start = |caching: bool| args.engine(caching);
    let on = start(true)?;
    run_batch(&on, &[synthetic_prompt(&on, 99, 16)?], 4)?;
    let mut cold = f64::MAX;
    let mut warm = f64::MAX;
    for i in 0..args.repeat.max(1) {
        // A fresh 400-token prefix each round: the first request misses, the second hits.
        let prefix = synthetic_prompt(&on, 1000 + i, 400)?;
        let with = |seed: usize| -> Result<Vec<u32>> {
            let mut p = prefix.clone();
            p.extend(synthetic_prompt(&on, seed, 16)?);
            Ok(p)
        };
        cold = cold.min(ttft(&on, &with(2000 + i)?)?);
        warm = warm.min(ttft(&on, &with(3000 + i)?)?);
    }

    // Throughput at a 0% hit rate: every prompt distinct, caching on vs off.
    let prompts_for = |e: &EngineHandle, round: usize| -> Result<Vec<Vec<u32>>> {
        (0..16)
            .map(|i| synthetic_prompt(e, 10_000 + round * 100 + i, 64))
            .collect()
    };
    let off = start(false)?;
    run_batch(&off, &[synthetic_prompt(&off, 99, 16)?], 4)?;
    let mut tput = [0f64; 2];
    let mut waste = Vec::new();
    for round in 0..args.repeat.max(1) {
        for (k, e) in [&off, &on].into_iter().enumerate() {
            let prompts = prompts_for(e, round * 2 + k)?;
            let e2 = e.clone();
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sampler = {
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut w = Vec::new();
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        let s = e2.stats();
                        let (a, u) = (s.kv_slots_allocated, s.kv_slots_used);
                        if a > 0 {
                            w.push(1.0 - u as f64 / a as f64);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    w
                })
            };
            let (n, secs) = run_batch(e, &prompts, args.decode_tokens)?;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            waste.extend(sampler.join().unwrap_or_default());
            tput[k] = tput[k].max(n as f64 / secs);
        }
    }
    let mean_waste = waste.iter().sum::<f64>() / waste.len().max(1) as f64;
    let (ratio, ttft_burst, ttft_other) = burst(&on, args.repeat.max(1))?;
    println!("| model | measure | value |");
    println!("| --- | --- | --- |");
    println!(
        "| {name} | TTFT, 400-token prefix not cached | {:.1} ms |",
        cold * 1e3
    );
    println!(
        "| {name} | TTFT, 400-token prefix cached | {:.1} ms |",
        warm * 1e3
    );
    println!(
        "| {name} | TTFT ratio cached / not cached | {:.3} |",
        warm / cold
    );
    println!(
        "| {name} | 16 x decode tok/s, caching off | {:.1} |",
        tput[0]
    );
    println!(
        "| {name} | 16 x decode tok/s, caching on, 0% hits | {:.1} |",
        tput[1]
    );
    println!(
        "| {name} | throughput ratio on / off | {:.3} |",
        tput[1] / tput[0]
    );
    println!(
        "| {name} | KV waste (unused / allocated slots, mean while decoding) | {:.1}% |",
        mean_waste * 100.0
    );
    println!(
        "| {name} | burst of 16 behind a fresh 368-token prefix: computed / ideal prompt tokens | {ratio:.3} |"
    );
    println!(
        "| {name} | same burst: TTFT p50, its requests / 4 unrelated sent with it | {:.0} / {:.0} ms |",
        ttft_burst * 1e3,
        ttft_other * 1e3
    );
    Ok(())
}

/// 16 requests behind one fresh 368-token prefix (23 blocks of 16) and 4 unrelated ones of the same
/// length, submitted at once: prompt tokens computed over the ideal (the prefix once, then each
/// request's own 16), and the median TTFT of each kind. Medians over `rounds` fresh prefixes.
fn burst(e: &EngineHandle, rounds: usize) -> Result<(f64, f64, f64)> {
    let (prefix_len, own, n, others) = (368, 16, 16, 4);
    let mut rows = Vec::new();
    for r in 0..rounds {
        let prefix = synthetic_prompt(e, 20_000 + r, prefix_len)?;
        let mut prompts = Vec::new();
        for i in 0..n + others {
            let mut p = if i < n {
                prefix.clone()
            } else {
                synthetic_prompt(e, 30_000 + r * 100 + i, prefix_len)?
            };
            p.extend(synthetic_prompt(e, 40_000 + r * 100 + i, own)?);
            prompts.push(p);
        }
        let before = e.stats().prefill_tokens;
        let t0 = Instant::now();
        let rxs = prompts
            .iter()
            .map(|p| {
                let params = SamplingParams {
                    max_tokens: Some(4),
                    ..SamplingParams::greedy()
                };
                e.submit(Request::new(p.clone(), params))
            })
            .collect::<Result<Vec<_>>>()?;
        let firsts: Vec<f64> = std::thread::scope(|s| {
            let waits: Vec<_> = rxs
                .into_iter()
                .map(|rx| {
                    s.spawn(move || {
                        let mut first = None;
                        for ev in rx.iter() {
                            match ev {
                                Event::Token(_) if first.is_none() => {
                                    first = Some(t0.elapsed().as_secs_f64());
                                }
                                Event::Finished { .. } | Event::Error(_) => break,
                                _ => {}
                            }
                        }
                        first.unwrap_or(f64::NAN)
                    })
                })
                .collect();
            waits
                .into_iter()
                .map(|w| w.join().unwrap_or(f64::NAN))
                .collect()
        });
        let computed = (e.stats().prefill_tokens - before) as f64;
        let ideal = (prefix_len + n * own + others * (prefix_len + own)) as f64;
        rows.push((computed / ideal, median(&firsts[..n]), median(&firsts[n..])));
    }
    let col = |f: fn(&(f64, f64, f64)) -> f64| median(&rows.iter().map(f).collect::<Vec<_>>());
    Ok((col(|r| r.0), col(|r| r.1), col(|r| r.2)))
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.suite == "route" {
        return route::suite(args);
    }
    if args.suite == "serve" {
        return serve_suite(args);
    }
    if args.suite == "embed" {
        return embed::suite(args);
    }
    if args.suite == "cache" {
        return cache::suite(args);
    }
    if args.suite == "cost" {
        return cost::suite(args);
    }
    let name = args
        .model_path()?
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if args.suite == "prefix" {
        return prefix_suite(args, &name);
    }
    // Raw compute: a repeated prompt must not be served from the prefix cache.
    let engine = args.engine(false)?;
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
    let dev = args.device.as_deref().unwrap_or("auto");
    println!("| model | device | threads | measure | tok/s | engine ms/step | forward ms/step | device ms/step |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {name} | {dev} | {threads} | prefill ({} tokens) | {prefill:.1} | | | |",
        args.prefill_tokens
    );
    println!("| {name} | {dev} | {threads} | decode, 1 stream | {single:.1} | | | |");
    for &b in &args.batches {
        let prompts = (0..b)
            .map(|i| synthetic_prompt(&engine, 10 + i, 16))
            .collect::<Result<Vec<_>>>()?;
        // Aggregate: all generated tokens over wall time (16-token prompts make prefill negligible).
        let mut split = StepSplit::default();
        let _ = crate::device::take_op_profile();
        let agg = best(&mut || {
            let before = StepSplit::read(&engine);
            let (n, secs) = run_batch(&engine, &prompts, args.decode_tokens)?;
            split = StepSplit::read(&engine).since(&before);
            Ok(n as f64 / secs)
        })?;
        println!(
            "| {name} | {dev} | {threads} | decode, {b} sequences (aggregate) | {agg:.1} | {:.2} | {:.2} | {:.2} |",
            split.per_step(split.step_us),
            split.per_step(split.forward_us),
            split.per_step(split.device_us),
        );
        if let Some(table) = crate::device::take_op_profile() {
            println!("\nDecode steps' device time by op, {b} sequences (HEARTH_CUDA_PROFILE):\n\n{table}");
        }
    }
    Ok(())
}

/// Where a measurement's step time went: whole engine steps, their forward passes (host wall time
/// including the logits read-back) and the device time of the forwards (CUDA events on a GPU). Engine
/// minus forward is scheduling, sampling and replies; forward minus device is host dispatch the device
/// did not hide.
#[derive(Debug, Default, Clone, Copy)]
struct StepSplit {
    steps: u64,
    step_us: u64,
    forward_us: u64,
    device_us: u64,
}

impl StepSplit {
    fn read(e: &EngineHandle) -> Self {
        let s = e.stats();
        Self {
            steps: s.steps,
            step_us: s.step_micros,
            forward_us: s.busy_micros,
            device_us: s.device_nanos / 1000,
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            steps: self.steps - before.steps,
            step_us: self.step_us - before.step_us,
            forward_us: self.forward_us - before.forward_us,
            device_us: self.device_us - before.device_us,
        }
    }

    fn per_step(&self, us: u64) -> f64 {
        us as f64 / 1e3 / self.steps.max(1) as f64
    }
}

fn serve_suite(args: &BenchArgs) -> Result<()> {
    if args.url.is_empty() && args.from.is_empty() {
        return Err(crate::HearthError::InvalidRequest(
            "the serve suite needs --url (or --from)".into(),
        ));
    }
    let mut earlier = Vec::new();
    for f in &args.from {
        let text = std::fs::read_to_string(f)
            .map_err(|e| crate::HearthError::InvalidRequest(format!("{}: {e}", f.display())))?;
        let runs: Vec<serve::ServerRun> = serde_json::from_str(&text)
            .map_err(|e| crate::HearthError::InvalidRequest(format!("{}: {e}", f.display())))?;
        earlier.extend(runs);
    }
    let model = match (&args.model, args.url.is_empty()) {
        (Some(m), _) => m.to_string_lossy().into_owned(),
        (None, true) => String::new(),
        (None, false) => args.model_path()?.to_string_lossy().into_owned(),
    };
    let plan = serve::ServePlan {
        model,
        levels: args.levels.clone(),
        requests: args.requests,
        max_tokens: args.max_tokens,
        prompt_tokens: args.prompt_tokens,
        ignore_eos: args.ignore_eos,
        api_key: args.api_key.clone(),
    };
    let runs = args
        .url
        .iter()
        .map(|u| serve::run(u, &plan))
        .collect::<Result<Vec<_>>>()?;
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&runs)
            .map_err(|e| crate::HearthError::Internal(e.to_string()))?;
        std::fs::write(p, text)
            .map_err(|e| crate::HearthError::Internal(format!("{}: {e}", p.display())))?;
    }
    let shown: Vec<serve::ServerRun> = earlier.into_iter().chain(runs).collect();
    println!("{}", serve::table(&shown));
    if let Some(p) = &args.plot {
        serve::plot(&shown, p)?;
    }
    Ok(())
}
