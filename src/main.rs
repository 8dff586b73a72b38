//! The `hearth` binary: CLI over the library. `anyhow` lives only here, at the edge.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use hearth::config::{Config, ModelEntry};
use hearth::engine::{Engine, EngineConfig, Event, Request, SamplingParams};
use hearth::model::{AttentionBackend, ChatMessage, Model};
use hearth::text::TextStream;

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
        /// cuda:N, metal, cpu (default: the best available).
        #[arg(long)]
        device: Option<String>,
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
        /// cuda:N, metal, cpu (default: the config's, else the best available).
        #[arg(long)]
        device: Option<String>,
        /// The usage ledger: a SQLite file or a postgres:// URL (default: the config's, else
        /// data/usage.sqlite3). `HEARTH_LEDGER_URL` in the environment also sets the URL.
        #[arg(long)]
        ledger: Option<String>,
    },
    /// Measure prefill and decode throughput of a model on this machine, or the router's cost /
    /// quality (`--suite route`).
    Bench(Box<hearth::bench::BenchArgs>),
    /// Route groups: `calibrate` runs the served models over prompts with checkable answers and
    /// prints the escalation thresholds' cost / quality curve and the thresholds for a target.
    Route {
        #[command(subcommand)]
        cmd: RouteCmd,
    },
    /// Write next-token logits of prompts (prefill, cached prefill, decode) for comparison with a
    /// reference implementation: raw little-endian f32 rows to --out, row descriptions to stdout.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// A JSON file holding a list of token-id lists.
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        device: Option<String>,
        /// portable, cpu or cuda (default: the fastest for the device).
        #[arg(long)]
        attention: Option<String>,
    },
    /// Usage totals from a usage ledger, as a table, CSV or JSON (for finance exports).
    Usage {
        /// A SQLite file or a postgres:// URL (a password may come from `PGPASSWORD`).
        #[arg(long, default_value = hearth::config::DEFAULT_LEDGER)]
        ledger: String,
        /// PEM CA certificates for a PostgreSQL ledger reached with `sslmode=require`.
        #[arg(long)]
        ledger_ca_file: Option<PathBuf>,
        /// Unix seconds, inclusive.
        #[arg(long)]
        start: Option<i64>,
        /// Unix seconds, exclusive.
        #[arg(long)]
        end: Option<i64>,
        /// Any of tenant,model,user,day.
        #[arg(long, default_value = "")]
        group_by: String,
        #[arg(long)]
        tenant: Option<String>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Write a model's tokenizer as a Hugging Face tokenizer.json.
    ExportTokenizer {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// The ledger's totals in `format` (table, csv, json).
fn print_usage(
    rows: &[hearth::ledger::UsageRow],
    group_by: &[hearth::ledger::GroupBy],
    format: &str,
) -> Result<()> {
    use hearth::ledger::GroupBy;
    if format == "json" {
        let v = serde_json::json!({"object": "list", "data": rows});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut header: Vec<&str> = group_by
        .iter()
        .map(|g| match g {
            GroupBy::Tenant => "tenant",
            GroupBy::Model => "model",
            GroupBy::User => "user",
            GroupBy::Day => "day",
        })
        .collect();
    header.extend([
        "requests",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "device_time_ms",
        "cache_hits",
        "saved_device_time_ms",
    ]);
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells: Vec<String> = group_by
                .iter()
                .map(|g| {
                    match g {
                        GroupBy::Tenant => &r.tenant,
                        GroupBy::Model => &r.model,
                        GroupBy::User => &r.user,
                        GroupBy::Day => &r.day,
                    }
                    .clone()
                    .unwrap_or_default()
                })
                .collect();
            cells.extend([
                r.requests.to_string(),
                r.prompt_tokens.to_string(),
                r.cached_tokens.to_string(),
                r.completion_tokens.to_string(),
                format!("{:.3}", r.device_time_ms),
                r.cache_hits.to_string(),
                format!("{:.3}", r.saved_device_time_ms),
            ]);
            cells
        })
        .collect();
    match format {
        "csv" => {
            let quote = |c: &str| {
                if c.contains([',', '"', '\n']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c.to_string()
                }
            };
            println!("{}", header.join(","));
            for l in &lines {
                println!(
                    "{}",
                    l.iter().map(|c| quote(c)).collect::<Vec<_>>().join(",")
                );
            }
        }
        "table" => {
            let widths: Vec<usize> = (0..header.len())
                .map(|i| {
                    lines
                        .iter()
                        .map(|l| l[i].len())
                        .chain([header[i].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let row = |cells: Vec<&str>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            println!("{}", row(header.clone()));
            for l in &lines {
                println!("{}", row(l.iter().map(String::as_str).collect()));
            }
        }
        other => anyhow::bail!("--format {other}: expected table, csv or json"),
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum RouteCmd {
    Calibrate {
        /// Prompts with checkable answers (JSON lines; see benches/make_route_set.py).
        #[arg(long, default_value = "benches/route_set.jsonl")]
        data: PathBuf,
        /// The server config whose models are calibrated (default: the default models).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The largest share of requests that may escalate.
        #[arg(long, default_value_t = 0.4)]
        target_large_share: f64,
    },
}

fn main() -> Result<()> {
    hearth::telemetry::init_tracing();
    match Cli::parse().cmd {
        Cmd::Usage {
            ledger,
            ledger_ca_file,
            start,
            end,
            group_by,
            tenant,
            format,
        } => {
            let group_by = hearth::ledger::GroupBy::parse_list(&group_by)?;
            let q = hearth::ledger::UsageQuery {
                start,
                end,
                tenant,
                group_by: group_by.clone(),
            };
            let target = hearth::ledger::Target::parse(&ledger, ledger_ca_file.as_deref())?;
            if let hearth::ledger::Target::Sqlite(p) = &target {
                anyhow::ensure!(p.exists(), "no usage ledger at {}", p.display());
            }
            let rows = target.query(&q)?;
            print_usage(&rows, &group_by, &format)?;
        }
        Cmd::Serve {
            config,
            host,
            port,
            models,
            device,
            ledger,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Ok(url) = std::env::var("HEARTH_LEDGER_URL") {
                cfg.ledger_url = Some(url);
            }
            match ledger {
                // Any URL is the database's (a non-postgres one is refused when the server
                // starts, rather than taken for a file name).
                Some(l) if l.contains("://") => cfg.ledger_url = Some(l),
                Some(l) => {
                    cfg.ledger_path = Some(l.into());
                    cfg.ledger_url = None;
                }
                None => {}
            }
            if device.is_some() {
                cfg.device = device;
            }
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
                        Ok(ModelEntry::new(name, path))
                    })
                    .collect::<Result<Vec<_>>>()?;
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let device = hearth::device::select(cfg.device.as_deref())?;
            tracing::info!(device = ?device, "compute device");
            rt.block_on(hearth::server::run(cfg, config, device))?;
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
            device,
        } => {
            let device = hearth::device::select(device.as_deref())?;
            let m = Model::load(&model, "cli", &device)
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
                weight: 1,
                constraint: None,
                prompt: ids,
                params,
            })?;
            let mut text = TextStream::new(engine.tokenizer.clone(), Vec::new().into());
            let mut out = std::io::stdout().lock();
            for ev in rx.iter() {
                match ev {
                    Event::Token(s) => {
                        let piece = text.push(s.token)?;
                        out.write_all(piece.as_bytes())?;
                        out.flush()?;
                    }
                    Event::Admitted { .. } | Event::Prefilled { .. } => {}
                    Event::Finished { .. } => break,
                    Event::Error(e) => anyhow::bail!(e),
                }
            }
            out.write_all(text.finish()?.as_bytes())?;
            writeln!(out)?;
        }
        Cmd::Bench(args) => hearth::bench::run(&args)?,
        Cmd::Route {
            cmd:
                RouteCmd::Calibrate {
                    data,
                    config,
                    target_large_share,
                },
        } => hearth::bench::route::calibrate(&data, config.as_deref(), target_large_share)?,
        Cmd::Logits {
            model,
            prompts,
            out,
            device,
            attention,
        } => {
            let device = hearth::device::select(device.as_deref())?;
            let m = Model::load(&model, "logits", &device)
                .with_context(|| format!("loading {}", model.display()))?;
            let prompts: Vec<Vec<u32>> = serde_json::from_str(
                &std::fs::read_to_string(&prompts)
                    .with_context(|| format!("reading {}", prompts.display()))?,
            )?;
            let backend = match attention.as_deref() {
                Some(a) => AttentionBackend::parse(a)?,
                None => AttentionBackend::best_for(&device, m.decoder.cfg.dtype),
            };
            // The decode stage goes through a CUDA graph where this build and device have them
            // (HEARTH_CUDA_GRAPHS=0 turns them off): the check then covers graph replay too.
            let staged = hearth::logits::staged_logits_with(&m, &prompts, backend, 16, true)?;
            let (infos, rows) = (staged.infos, staged.rows);
            let mut bytes = Vec::with_capacity(rows.len() * m.decoder.cfg.vocab * 4);
            for v in rows.iter().flatten() {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            std::fs::write(&out, bytes)?;
            println!(
                "{}",
                serde_json::json!({
                    "vocab": m.decoder.cfg.vocab,
                    "dtype": format!("{:?}", m.decoder.cfg.dtype),
                    "attention": format!("{backend:?}"),
                    "rows": infos,
                    "graph_replay_vs_first_max": staged.graph_replay_vs_first_max,
                    "graph_steps_vs_eager_max": staged.graph_steps_vs_eager_max,
                    "picks_vs_host": hearth::logits::pick_check(&rows, &device)?,
                })
            );
        }
        Cmd::ExportTokenizer { model, out } => {
            let m = Model::load(&model, "export", &candle_core::Device::Cpu)
                .with_context(|| format!("loading {}", model.display()))?;
            m.tokenizer.save_json(&out)?;
        }
    }
    Ok(())
}
