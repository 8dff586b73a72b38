//! The `hearth` binary: CLI over the library. `anyhow` lives only here, at the edge.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};

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
    /// Measure prefill and decode throughput of a model on this machine.
    Bench(hearth::bench::BenchArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
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
