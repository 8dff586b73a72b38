//! The `hearth` binary: CLI over the library. `anyhow` lives only here, at the edge.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};

use hearth::config::{Config, ModelEntry};
use hearth::engine::{Engine, EngineConfig, Event, Request, SamplingParams};
use hearth::model::{ChatMessage, Model};
use hearth::streaming::TextStream;

#[derive(Parser)]
#[command(name = "hearth", version, about = "Self-hosted LLM inference server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text for one prompt and stream it to stdout.
    Generate {
        /// A GGUF file, or a folder with a safetensors checkpoint.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user turn in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
    },
    /// Serve the OpenAI-compatible HTTP API (defaults: both models in models/, 127.0.0.1:8080).
    Serve {
        /// A TOML config file; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// NAME=PATH; repeat to serve several models (replaces the configured list).
        #[arg(long = "model")]
        models: Vec<String>,
    },
    /// Measure prefill and decode throughput of a model on this machine.
    Bench(hearth::bench::BenchArgs),
}

fn main() -> Result<()> {
    hearth::telemetry::init_tracing();
    match Cli::parse().cmd {
        Cmd::Serve {
            config,
            host,
            port,
            models,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(h) = host {
                cfg.host = h;
            }
            if let Some(p) = port {
                cfg.port = p;
            }
            if !models.is_empty() {
                cfg.models = models
                    .iter()
                    .map(|m| {
                        let (name, path) = m
                            .split_once('=')
                            .with_context(|| format!("--model {m}: expected NAME=PATH"))?;
                        Ok(ModelEntry {
                            name: name.to_string(),
                            path: path.into(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(hearth::server::run(cfg, Device::Cpu))?;
        }
        Cmd::Generate {
            model,
            prompt,
            chat,
            max_tokens,
            temperature,
            seed,
            top_k,
            top_p,
        } => {
            let m = Model::load(&model, "cli", &Device::Cpu)
                .with_context(|| format!("loading {}", model.display()))?;
            let ids = if chat {
                m.chat_prompt(&[ChatMessage::new("user", &prompt)])?
            } else {
                m.tokenizer.encode(&prompt)?
            };
            let engine = Engine::start(m, EngineConfig::default())?;
            let params = SamplingParams {
                temperature,
                seed,
                top_k,
                top_p,
                max_tokens: Some(max_tokens),
                ..Default::default()
            };
            let rx = engine.submit(Request {
                tenant: None,
                prompt: ids,
                params,
            })?;
            let mut text = TextStream::new(engine.tokenizer.clone(), Vec::new());
            let mut out = std::io::stdout().lock();
            for ev in rx.iter() {
                match ev {
                    Event::Token(s) => {
                        let piece = text.push(s.token)?;
                        out.write_all(piece.as_bytes())?;
                        out.flush()?;
                    }
                    Event::Admitted { .. } => {}
                    Event::Finished { .. } => break,
                    Event::Error(e) => anyhow::bail!(e),
                }
            }
            out.write_all(text.finish()?.as_bytes())?;
            writeln!(out)?;
        }
        Cmd::Bench(args) => hearth::bench::run(&args)?,
    }
    Ok(())
}
