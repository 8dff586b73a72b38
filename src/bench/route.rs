//! The router's cost / quality measurement over real HTTP to an in-process server: every prompt of a
//! data set (checkable answers) asked of the cheapest model, the largest, and a route group, with
//! each arm's accuracy, device time, and the largest model's device time. `calibrate` runs the
//! cheap model with its signals recorded and the large one, then sweeps the escalation thresholds.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{json, Value};

use super::BenchArgs;
use crate::config::Config;
use crate::error::{HearthError, Result};
use crate::router::{RouteConfig, Thresholds};

/// One prompt with the answers that count as right.
#[derive(Debug, Clone, Deserialize)]
pub struct Item {
    pub kind: String,
    pub prompt: String,
    pub answers: Vec<String>,
    /// `tune` (what thresholds are calibrated on) or `heldout`.
    #[serde(default)]
    pub split: String,
}

pub fn load(path: &Path) -> Result<Vec<Item>> {
    load_jsonl(path)
}

/// Every non-blank line of a JSON-lines file, parsed.
pub fn load_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| HearthError::Config(format!("{}: {e}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| HearthError::Config(format!("{}: {e}: {l}", path.display())))
        })
        .collect()
}

/// Lower-case words, so that an answer matches whole words only ("12" is not in "120").
fn words(s: &str) -> String {
    let w: String = s
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect();
    format!(" {} ", w.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Whether a completion gives one of the answers.
pub fn is_right(text: &str, answers: &[String]) -> bool {
    let t = words(text);
    answers.iter().any(|a| t.contains(&words(a)))
}

/// One prompt's result in one arm.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub right: bool,
    pub device_ms: f64,
    /// `metrics.route`, for a route group.
    pub route: Option<Value>,
    /// `metrics.cache`, when the response cache is on.
    pub cache: Option<Value>,
}

/// The server the measurement runs against: the config's models, the given routes, no ledger.
pub(super) struct Bench {
    rt: tokio::runtime::Runtime,
    server: crate::server::Server,
    base: String,
}

impl Bench {
    fn start(config: Option<&Path>, routes: Vec<RouteConfig>) -> Result<Self> {
        let mut cfg = Config::load(config)?;
        if !routes.is_empty() {
            cfg.routes = routes;
        }
        Self::with(cfg)
    }

    /// A server of `cfg` on a free local port, without a ledger.
    pub(super) fn with(mut cfg: Config) -> Result<Self> {
        cfg.host = "127.0.0.1".into();
        cfg.port = 0;
        cfg.ledger_path = None;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let device = crate::device::select(cfg.device.as_deref())?;
        let mut server = rt.block_on(crate::server::Server::start(cfg, device))?;
        rt.block_on(server.wait_ready())?;
        let base = format!("http://{}", server.addr);
        Ok(Self { rt, server, base })
    }

    /// Served models, cheapest first, as `auto` orders them.
    pub(super) fn models_by_cost(&self) -> Vec<String> {
        let mut m: Vec<(String, u128)> = self
            .server
            .state
            .engines
            .get()
            .map(|e| {
                e.iter()
                    .map(|(n, h)| (n.clone(), h.cost_per_token))
                    .collect()
            })
            .unwrap_or_default();
        m.sort_by_key(|(_, c)| *c);
        m.into_iter().map(|(n, _)| n).collect()
    }

    /// Device seconds the engine of `model` has run so far.
    fn device_secs(&self, model: &str) -> f64 {
        self.server
            .state
            .engines
            .get()
            .and_then(|e| e.iter().find(|(n, _)| n == model))
            .map_or(0.0, |(_, h)| h.stats().device_nanos as f64 / 1e9)
    }

    /// Ask every item of `model` (a model or a group), `concurrency` at a time, greedy.
    pub(super) fn arm(
        &self,
        model: &str,
        items: &[Item],
        max_tokens: usize,
        concurrency: usize,
    ) -> Vec<Outcome> {
        let next = Arc::new(Mutex::new(0usize));
        let out = Arc::new(Mutex::new(vec![None; items.len()]));
        std::thread::scope(|s| {
            for _ in 0..concurrency.max(1) {
                let (next, out) = (next.clone(), out.clone());
                s.spawn(move || loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(item) = items.get(i) else { break };
                    let o = ask(&self.base, model, item, max_tokens);
                    out.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(o);
                });
            }
        });
        let out = std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()));
        out.into_iter()
            .map(|o| {
                o.unwrap_or(Outcome {
                    right: false,
                    device_ms: 0.0,
                    route: None,
                    cache: None,
                })
            })
            .collect()
    }

    pub(super) fn stop(self) {
        let Self { rt, server, .. } = self;
        rt.block_on(server.shutdown(std::time::Duration::from_secs(5)));
    }
}

/// The decision-time quantiles the server's Prometheus summary holds for `auto`.
fn decision_quantiles(bench: &Bench) -> String {
    let text = bench.server.state.prometheus.render();
    let q: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(crate::telemetry::names::ROUTER_DECISION_SECONDS))
        .filter(|l| l.contains("quantile"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let quantile = name.split("quantile=\"").nth(1)?.split('"').next()?;
            let secs: f64 = value.parse().ok()?;
            Some(format!("quantile {quantile}: {:.3} ms", secs * 1e3))
        })
        .collect();
    if q.is_empty() {
        "not recorded".into()
    } else {
        q.join(", ")
    }
}

fn ask(base: &str, model: &str, item: &Item, max_tokens: usize) -> Outcome {
    let body =
        json!({"model": model, "prompt": item.prompt, "max_tokens": max_tokens, "temperature": 0});
    let v: Option<Value> = ureq::post(&format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .and_then(|t| serde_json::from_str(&t).ok());
    let Some(v) = v else {
        tracing::warn!(model, prompt = %item.prompt, "request failed");
        return Outcome {
            right: false,
            device_ms: 0.0,
            route: None,
            cache: None,
        };
    };
    let text = v["choices"][0]["text"].as_str().unwrap_or("");
    Outcome {
        right: is_right(text, &item.answers),
        device_ms: v["metrics"]["device_time_ms"].as_f64().unwrap_or(0.0),
        route: v["metrics"].get("route").cloned(),
        cache: v["metrics"].get("cache").cloned(),
    }
}

/// Tokens asked for per prompt: the answers are a word or two.
pub(super) const MAX_TOKENS: usize = 8;
pub(super) const CONCURRENCY: usize = 8;

/// A group that never escalates: the cheap model's answers with its signals.
fn probe_route(models: &[String]) -> RouteConfig {
    RouteConfig {
        name: "probe".into(),
        models: models.to_vec(),
        escalate_below: Thresholds {
            logprob_p10: f32::MIN,
            margin_p25: f32::MIN,
        },
        ..Default::default()
    }
}

struct ArmResult {
    name: String,
    outcomes: Vec<Outcome>,
    large_secs: f64,
    wall_secs: f64,
}

fn accuracy(o: &[Outcome], items: &[Item], split: Option<&str>) -> (usize, usize) {
    o.iter()
        .zip(items)
        .filter(|(_, it)| split.is_none_or(|s| it.split == s))
        .fold((0, 0), |(r, n), (o, _)| (r + usize::from(o.right), n + 1))
}

/// `hearth bench --suite route`: always-small, always-large and the route group `auto` (from
/// `--config`'s routes, or the default) over `--data`.
pub fn suite(args: &BenchArgs) -> Result<()> {
    let data = args.data_or("benches/route_set.jsonl");
    let items = load(&data)?;
    let bench = Bench::start(args.config.as_deref(), Vec::new())?;
    let models = bench.models_by_cost();
    let (Some(small), Some(large)) = (models.first().cloned(), models.last().cloned()) else {
        return Err(HearthError::Config(
            "the route suite needs served models".into(),
        ));
    };
    let mut arms = Vec::new();
    for name in [small.as_str(), large.as_str(), crate::router::DEFAULT_GROUP] {
        // Warm-up: first touch of the weights.
        bench.arm(name, &items[..2.min(items.len())], MAX_TOKENS, 1);
        let (l0, t0) = (bench.device_secs(&large), std::time::Instant::now());
        let outcomes = bench.arm(name, &items, MAX_TOKENS, CONCURRENCY);
        arms.push(ArmResult {
            name: name.to_string(),
            outcomes,
            large_secs: bench.device_secs(&large) - l0,
            wall_secs: t0.elapsed().as_secs_f64(),
        });
    }
    let overhead = decision_quantiles(&bench);
    bench.stop();
    let always_large = arms[1].large_secs.max(1e-9);
    println!(
        "{} prompts ({}), {} tokens each, {} at a time; small = {small}, large = {large}\n",
        items.len(),
        data.display(),
        MAX_TOKENS,
        CONCURRENCY
    );
    println!("| arm | accuracy | tune split | held-out split | device s | large-model device s | large vs always-large | escalated | wall s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for a in &arms {
        let pct = |(r, n): (usize, usize)| {
            format!("{:.1}% ({r}/{n})", 100.0 * r as f64 / n.max(1) as f64)
        };
        let device: f64 = a.outcomes.iter().map(|o| o.device_ms).sum::<f64>() / 1e3;
        let escalated = a
            .outcomes
            .iter()
            .filter(|o| {
                o.route
                    .as_ref()
                    .is_some_and(|r| r["escalated"] == json!(true))
            })
            .count();
        println!(
            "| {} | {} | {} | {} | {device:.1} | {:.1} | {:.0}% | {} | {:.0} |",
            a.name,
            pct(accuracy(&a.outcomes, &items, None)),
            pct(accuracy(&a.outcomes, &items, Some("tune"))),
            pct(accuracy(&a.outcomes, &items, Some("heldout"))),
            a.large_secs,
            100.0 * a.large_secs / always_large,
            if a.outcomes.iter().any(|o| o.route.is_some()) {
                format!("{escalated}/{}", a.outcomes.len())
            } else {
                "-".into()
            },
            a.wall_secs
        );
    }
    // A kept request against the same prompt asked of the small model by name.
    let (mut kept_auto, mut kept_small, mut kept) = (0.0, 0.0, 0usize);
    for (i, o) in arms[2].outcomes.iter().enumerate() {
        if o.route
            .as_ref()
            .is_some_and(|r| r["escalated"] == json!(false))
        {
            kept_auto += o.device_ms;
            kept_small += arms[0].outcomes[i].device_ms;
            kept += 1;
        }
    }
    println!(
        "\nKept by auto ({kept} prompts): {:.1} s of device time, the same prompts asked of the small model by name {:.1} s ({:+.1}%).",
        kept_auto / 1e3,
        kept_small / 1e3,
        100.0 * (kept_auto / kept_small.max(1e-9) - 1.0)
    );
    println!(
        "Router decision overhead (signals, thresholds, starting the next model): {overhead}."
    );
    println!("\nBy kind (accuracy: small / large / auto):");
    let mut kinds: BTreeMap<&str, [(usize, usize); 3]> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        let e = kinds.entry(&it.kind).or_default();
        for (k, a) in arms.iter().enumerate() {
            e[k].0 += usize::from(a.outcomes[i].right);
            e[k].1 += 1;
        }
    }
    for (kind, c) in kinds {
        println!(
            "- {kind}: {}/{} / {}/{} / {}/{}",
            c[0].0, c[0].1, c[1].0, c[1].1, c[2].0, c[2].1
        );
    }
    Ok(())
}

/// `hearth route calibrate`: the cheap model's signals and both models' correctness on the `tune`
/// split, then the escalation thresholds' cost / quality curve and the pair that is most accurate
/// within `target_large_share` of requests escalated.
pub fn calibrate(data: &Path, config: Option<&Path>, target_large_share: f64) -> Result<()> {
    let items: Vec<Item> = load(data)?
        .into_iter()
        .filter(|i| i.split.is_empty() || i.split == "tune")
        .collect();
    // The served models in cost order (a first start), then the cheap model with its signals (a
    // group that never escalates) and the large one.
    let first = Bench::start(config, Vec::new())?;
    let models = first.models_by_cost();
    first.stop();
    let bench = Bench::start(config, vec![probe_route(&models)])?;
    let (Some(large), true) = (models.last().cloned(), models.len() > 1) else {
        return Err(HearthError::Config(
            "calibration needs two served models".into(),
        ));
    };
    let small = bench.arm("probe", &items, MAX_TOKENS, CONCURRENCY);
    let big = bench.arm(&large, &items, MAX_TOKENS, CONCURRENCY);
    bench.stop();
    let signal = |o: &Outcome, k: &str| {
        o.route
            .as_ref()
            .and_then(|r| r["signals"][k].as_f64())
            .unwrap_or(f64::NEG_INFINITY)
    };
    let lp: Vec<f64> = small.iter().map(|o| signal(o, "logprob_p10")).collect();
    let mg: Vec<f64> = small.iter().map(|o| signal(o, "margin_p25")).collect();
    let candidates = |v: &[f64]| {
        let mut c: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        c.sort_by(f64::total_cmp);
        let mut out = vec![f64::NEG_INFINITY];
        for q in 1..=20 {
            if let Some(&x) = c.get((c.len() * q / 20).min(c.len().saturating_sub(1))) {
                out.push(x + 1e-6);
            }
        }
        out
    };
    let n = items.len().max(1) as f64;
    // (share escalated, accuracy, logprob threshold, margin threshold)
    let mut points = Vec::new();
    for &tl in &candidates(&lp) {
        for &tm in &candidates(&mg) {
            let mut right = 0usize;
            let mut up = 0usize;
            for i in 0..items.len() {
                let escalate = lp[i] < tl || mg[i] < tm;
                up += usize::from(escalate);
                right += usize::from(if escalate {
                    big[i].right
                } else {
                    small[i].right
                });
            }
            points.push((up as f64 / n, right as f64 / n, tl, tm));
        }
    }
    let small_acc = small.iter().filter(|o| o.right).count() as f64 / n;
    let large_acc = big.iter().filter(|o| o.right).count() as f64 / n;
    let oracle = small
        .iter()
        .zip(&big)
        .filter(|(s, b)| s.right || b.right)
        .count() as f64
        / n;
    println!(
        "{} tune prompts: always-{} {:.1}%, always-{large} {:.1}%, best possible router {:.1}%\n",
        items.len(),
        models[0],
        100.0 * small_acc,
        100.0 * large_acc,
        100.0 * oracle
    );
    println!("| escalated share at most | best accuracy | logprob_p10 below | margin_p25 below |");
    println!("| --- | --- | --- | --- |");
    for cap in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0] {
        if let Some(p) = best_within(&points, cap) {
            println!(
                "| {:.0}% | {:.1}% | {:.3} | {:.3} |",
                100.0 * cap,
                100.0 * p.1,
                p.2,
                p.3
            );
        }
    }
    match best_within(&points, target_large_share) {
        Some(p) => println!(
            "\nFor at most {:.0}% escalated ({:.1}% at these thresholds, accuracy {:.1}%), put in the route:\n\nescalate_below = {{ logprob_p10 = {:.3}, margin_p25 = {:.3} }}",
            100.0 * target_large_share,
            100.0 * p.0,
            100.0 * p.1,
            finite(p.2),
            finite(p.3)
        ),
        None => println!("\nNo thresholds keep escalations within {target_large_share}"),
    }
    Ok(())
}

/// The most accurate point with at most `cap` escalated (ties: fewer escalations).
fn best_within(points: &[(f64, f64, f64, f64)], cap: f64) -> Option<(f64, f64, f64, f64)> {
    points
        .iter()
        .filter(|p| p.0 <= cap + 1e-9)
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.total_cmp(&a.0)))
}

/// A threshold for the config file (-inf: never escalate on this signal).
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        -1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_match_whole_words_case_insensitively() {
        let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(is_right(" Paris, of course.", &a(&["Paris"])));
        assert!(is_right(" 12.", &a(&["12"])));
        assert!(!is_right(" 120 apples", &a(&["12"])));
        assert!(is_right(" the Blue Whale", &a(&["blue whale"])));
        assert!(!is_right(" Lyon", &a(&["Paris"])));
    }
}
