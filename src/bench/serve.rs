//! `hearth bench --suite serve`: an HTTP load generator for any OpenAI-compatible server (Hearth,
//! llama.cpp's `llama-server`, vLLM, ...). At each concurrency level it keeps that many streaming
//! `/v1/completions` requests in flight until `--requests` have finished, and reports aggregate
//! output tok/s, time to first token and inter-token latency percentiles, as a Markdown table, as
//! JSON (`--json`) and as an SVG chart with one line per server (`--plot`).
//!
//! The client is one blocking thread per stream (it sleeps in `read` between chunks) and reports
//! its own CPU time per level, so a reader can see that it took a negligible share of a 2-vCPU
//! machine from the server under test.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{HearthError, Result};

/// What one run measures.
#[derive(Debug, Clone)]
pub struct ServePlan {
    pub model: String,
    pub levels: Vec<usize>,
    pub requests: usize,
    pub max_tokens: usize,
    pub prompt_tokens: usize,
    pub ignore_eos: bool,
    pub api_key: Option<String>,
}

/// One request's stream as the client saw it.
#[derive(Debug, Clone, Default)]
struct Sample {
    ttft: Option<Duration>,
    /// Gaps between consecutive chunks that carried text.
    gaps: Vec<Duration>,
    tokens: usize,
    prompt_tokens: usize,
    error: Option<String>,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spread {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Spread {
    fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        xs.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least p% of the values at or below it.
        let at =
            |p: f64| xs[((p / 100.0 * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
        Self {
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
        }
    }
}

/// One concurrency level's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub failed: usize,
    pub output_tokens: usize,
    pub mean_prompt_tokens: f64,
    pub wall_s: f64,
    pub output_tok_s: f64,
    pub ttft_ms: Spread,
    /// Gaps between streamed chunks (one token each on Hearth and llama-server).
    pub itl_ms: Spread,
    /// The load generator's own CPU time over the level's wall time (1.0 = one core).
    pub client_cpu: f64,
}

/// One server's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerRun {
    pub label: String,
    pub url: String,
    pub model: String,
    pub levels: Vec<Level>,
}

/// Words the prompts are cut from (ordinary prose, so every tokenizer gives ~1.3 tokens a word).
const PROSE: &str = "The harbour town woke slowly that morning. Fishing boats rocked against the \
    stone quay while gulls argued over the night's catch, and the baker on the corner opened her \
    shutters to let the smell of bread drift down toward the water. Children ran past the old \
    customs house, where a clock had stopped at a quarter past nine years ago and nobody had \
    thought to mend it. Up on the hill, the lighthouse keeper wrote the weather into his ledger: \
    wind from the west, a thin rain coming, the sea grey and restless. He had kept that ledger for \
    thirty years, and his father before him, and in all that time the entries had changed less \
    than the town below.";

/// A prompt of about `tokens` tokens, different for every request (so no server answers from a
/// prefix cache what it would compute for a new user).
fn prompt(tokens: usize, level: usize, i: usize) -> String {
    let words: Vec<&str> = PROSE.split_whitespace().collect();
    let n = (tokens * 3 / 4).max(1);
    let start = (i * 7 + level * 13) % words.len();
    let body: Vec<&str> = (0..n).map(|k| words[(start + k) % words.len()]).collect();
    format!("Story {level}-{i}. {}", body.join(" "))
}

/// CPU time of the calling thread (of the process where threads cannot be told apart).
fn cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    let who = libc::RUSAGE_THREAD;
    #[cfg(not(target_os = "linux"))]
    let who = libc::RUSAGE_SELF;
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn one(agent: &ureq::Agent, url: &str, key: Option<&str>, body: &Value) -> Sample {
    let mut s = Sample::default();
    let t0 = Instant::now();
    let mut req = agent
        .post(format!("{url}/v1/completions"))
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = match req.send(body.to_string()) {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    if !resp.status().is_success() {
        s.error = Some(format!("HTTP {}", resp.status()));
        return s;
    }
    let mut chunks = 0;
    let mut last: Option<Instant> = None;
    let reader = BufReader::new(resp.into_body().into_reader());
    for line in reader.lines() {
        let Ok(line) = line else {
            s.error = Some("the stream broke".into());
            break;
        };
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            s.tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let text = v["choices"][0]["text"].as_str().unwrap_or("");
        if text.is_empty() {
            continue;
        }
        let now = Instant::now();
        chunks += 1;
        match last {
            None => s.ttft = Some(now - t0),
            Some(l) => s.gaps.push(now - l),
        }
        last = Some(now);
    }
    // A server that sends no usage chunk: count the chunks that carried text.
    if s.tokens == 0 {
        s.tokens = chunks;
    }
    s
}

/// One stream's loop: take the next request until the level's count is reached.
fn stream_until_done(
    agent: &ureq::Agent,
    url: &str,
    plan: &ServePlan,
    concurrency: usize,
    next: &AtomicUsize,
    samples: &Mutex<Vec<Sample>>,
) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= plan.requests {
            break;
        }
        let mut body = json!({
            "model": plan.model,
            "prompt": prompt(plan.prompt_tokens, concurrency, i),
            "max_tokens": plan.max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if plan.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        let s = one(agent, url, plan.api_key.as_deref(), &body);
        samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(s);
    }
}

fn level(url: &str, plan: &ServePlan, concurrency: usize) -> Level {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(plan.requests));
    // The generator's own cost: its threads' CPU time (in a test the server shares the process).
    let cpu = Mutex::new(Duration::ZERO);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.min(plan.requests) {
            scope.spawn(|| {
                let start = cpu_time();
                stream_until_done(&agent, url, plan, concurrency, &next, &samples);
                *cpu.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) +=
                    cpu_time().saturating_sub(start);
            });
        }
    });
    let wall = t0.elapsed();
    let cpu = cpu
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);

    let samples = samples
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    if let Some(e) = samples.iter().find_map(|s| s.error.as_ref()) {
        tracing::warn!(url, concurrency, error = %e, "requests failed");
    }
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let output_tokens = ok.iter().map(|s| s.tokens).sum();
    Level {
        concurrency,
        requests: samples.len(),
        failed: samples.len() - ok.len(),
        output_tokens,
        mean_prompt_tokens: ok.iter().map(|s| s.prompt_tokens as f64).sum::<f64>()
            / ok.len().max(1) as f64,
        wall_s: wall.as_secs_f64(),
        output_tok_s: output_tokens as f64 / wall.as_secs_f64().max(1e-9),
        ttft_ms: Spread::of(ok.iter().filter_map(|s| s.ttft.as_ref()).map(ms).collect()),
        itl_ms: Spread::of(ok.iter().flat_map(|s| s.gaps.iter()).map(ms).collect()),
        client_cpu: cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9),
    }
}

/// Run every level against one server; `label=URL` names the server in the table and chart.
pub fn run(server: &str, plan: &ServePlan) -> Result<ServerRun> {
    let (label, url) = match server.split_once('=') {
        Some((l, u)) if !l.contains("://") => (l.to_string(), u),
        _ => (server.to_string(), server),
    };
    let url = url.trim_end_matches('/').to_string();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        // Commas separate servers, so "SmolLM2, Hearth=URL" arrives as two: refuse before any
        // level runs rather than measure a server that is not one.
        return Err(HearthError::InvalidRequest(format!(
            "`{server}` is not URL or LABEL=URL with an http(s) URL (a comma separates servers, so a label cannot hold one)"
        )));
    }
    if plan.levels.is_empty() || plan.requests == 0 {
        return Err(HearthError::InvalidRequest(
            "the serve suite needs --levels and --requests above 0".into(),
        ));
    }
    let mut levels = Vec::new();
    for &c in &plan.levels {
        let l = level(&url, plan, c.max(1));
        eprintln!(
            "{label}: {c} streams: {:.1} tok/s, TTFT p50 {:.0} ms, {} failed",
            l.output_tok_s, l.ttft_ms.p50, l.failed
        );
        levels.push(l);
    }
    Ok(ServerRun {
        label,
        url,
        model: plan.model.clone(),
        levels,
    })
}

/// The runs as one Markdown table.
pub fn table(runs: &[ServerRun]) -> String {
    let mut out = String::from(
        "| server | streams | requests (failed) | prompt tokens | output tok/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | client CPU |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in runs {
        for l in &r.levels {
            out.push_str(&format!(
                "| {} | {} | {} ({}) | {:.0} | {:.1} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.1}% |\n",
                r.label,
                l.concurrency,
                l.requests,
                l.failed,
                l.mean_prompt_tokens,
                l.output_tok_s,
                l.ttft_ms.p50,
                l.ttft_ms.p90,
                l.ttft_ms.p99,
                l.itl_ms.p50,
                l.itl_ms.p90,
                l.itl_ms.p99,
                l.client_cpu * 100.0,
            ));
        }
    }
    out
}

/// Aggregate tok/s and TTFT p50 against concurrency, one line per server, as an SVG file.
pub fn plot(runs: &[ServerRun], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| HearthError::Internal(format!("plot: {e}"));
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(500);
    let max_c = runs
        .iter()
        .flat_map(|r| r.levels.iter().map(|l| l.concurrency))
        .max()
        .unwrap_or(1) as f64;
    type Pick = fn(&Level) -> f64;
    let panels: [(&DrawingArea<SVGBackend, _>, &str, &str, Pick); 2] = [
        (&left, "Output tokens/s (all streams)", "tok/s", |l| {
            l.output_tok_s
        }),
        (&right, "Time to first token, p50", "ms", |l| l.ttft_ms.p50),
    ];
    for (area, title, unit, pick) in panels {
        let max_y = runs
            .iter()
            .flat_map(|r| r.levels.iter().map(pick))
            .fold(0.0f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..max_c * 1.05, 0.0..max_y.max(1.0))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("concurrent streams")
            .y_desc(unit)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, r) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = r
                .levels
                .iter()
                .map(|l| (l.concurrency as f64, pick(l)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(r.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_is_not_an_http_url_is_refused_before_measuring() {
        let plan = ServePlan {
            model: "m".into(),
            levels: vec![1],
            requests: 1,
            max_tokens: 1,
            prompt_tokens: 10,
            ignore_eos: false,
            api_key: None,
        };
        for bad in ["SmolLM2", " Hearth", "label=localhost:8080"] {
            let err = run(bad, &plan)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("LABEL=URL"), "{bad}: {err}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Spread::of((1..=100).map(f64::from).collect());
        assert_eq!((s.p50, s.p90, s.p99), (50.0, 90.0, 99.0));
        let one = Spread::of(vec![7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
        assert_eq!(Spread::of(Vec::new()).p50, 0.0);
    }

    #[test]
    fn prompts_differ_per_request_and_scale_with_the_length_asked() {
        assert_ne!(prompt(200, 4, 0), prompt(200, 4, 1));
        let words = prompt(200, 1, 0).split_whitespace().count();
        assert!((150..=155).contains(&words), "{words}");
    }
}
