//! `hearth bench --suite cost`: device time per 1,000 requests of a mixed workload (`--data`,
//! default benches/cost_workload.jsonl: repeated and paraphrased questions under a shared
//! instruction prefix, easy and hard ones) with routing + prefix reuse + the response cache on,
//! against the largest model with every cache off, and the accuracy of both. Device time is what
//! the responses report (`metrics.device_time_ms`: the metered share of each step, the semantic
//! lookup's embedding included).
use std::collections::BTreeMap;
use std::time::Instant;

use serde::Deserialize;

use super::route::{Bench, Item, Outcome, CONCURRENCY, MAX_TOKENS};
use super::BenchArgs;
use crate::cache::CacheConfig;
use crate::config::Config;
use crate::error::{HearthError, Result};

#[derive(Debug, Clone, Deserialize)]
struct Request {
    prompt: String,
    answers: Vec<String>,
    kind: String,
    /// first, repeat or paraphrase.
    form: String,
    /// Which question (requests of one item have the same right answers).
    item: usize,
}

struct Arm {
    name: String,
    outcomes: Vec<Outcome>,
    wall_secs: f64,
}

impl Arm {
    fn device_secs(&self) -> f64 {
        self.outcomes.iter().map(|o| o.device_ms).sum::<f64>() / 1e3
    }

    fn right(&self, pick: impl Fn(usize) -> bool) -> (usize, usize) {
        self.outcomes
            .iter()
            .enumerate()
            .filter(|(i, _)| pick(*i))
            .fold((0, 0), |(r, n), (_, o)| (r + usize::from(o.right), n + 1))
    }

    fn hits(&self, kind: &str) -> usize {
        self.outcomes
            .iter()
            .filter(|o| hit_kind(o) == Some(kind))
            .count()
    }
}

/// `exact` or `semantic` when the response cache answered the request.
fn hit_kind(o: &Outcome) -> Option<&str> {
    let c = o.cache.as_ref()?;
    (c["hit"] == true).then(|| c["kind"].as_str()).flatten()
}

fn run(cfg: Config, model: Option<&str>, name: &str, items: &[Item]) -> Result<Arm> {
    let bench = Bench::with(cfg)?;
    let model = match model {
        Some(m) => m.to_string(),
        None => bench
            .models_by_cost()
            .last()
            .cloned()
            .ok_or_else(|| HearthError::Config("no served model".into()))?,
    };
    // Warm-up on a prompt outside the workload (first touch of the weights).
    let warm = Item {
        kind: "warm-up".into(),
        prompt: "The first month of the year is".into(),
        answers: vec!["January".into()],
        split: String::new(),
    };
    bench.arm(&model, std::slice::from_ref(&warm), MAX_TOKENS, 1);
    let t0 = Instant::now();
    let outcomes = bench.arm(&model, items, MAX_TOKENS, CONCURRENCY);
    let wall_secs = t0.elapsed().as_secs_f64();
    bench.stop();
    Ok(Arm {
        name: format!("{name} ({model})"),
        outcomes,
        wall_secs,
    })
}

pub fn suite(args: &BenchArgs) -> Result<()> {
    let data = args.data_or("benches/cost_workload.jsonl");
    let requests: Vec<Request> = super::route::load_jsonl(&data)?;
    let items: Vec<Item> = requests
        .iter()
        .map(|r| Item {
            kind: r.kind.clone(),
            prompt: r.prompt.clone(),
            answers: r.answers.clone(),
            split: String::new(),
        })
        .collect();
    let base = match &args.config {
        Some(p) => Config::load(Some(p))?,
        None => Config::default(),
    };
    let large = run(
        Config {
            prefix_caching: false,
            cache: CacheConfig::default(),
            ..base.clone()
        },
        None,
        "always-large, caches off",
        &items,
    )?;
    let all_on = run(
        Config {
            prefix_caching: true,
            cache: CacheConfig {
                exact: true,
                semantic: true,
                ..base.cache.clone()
            },
            ..base
        },
        Some(crate::router::DEFAULT_GROUP),
        "routing + prefix reuse + response cache",
        &items,
    )?;
    let n = requests.len();
    let per_1000 = |a: &Arm| a.device_secs() * 1000.0 / n.max(1) as f64;
    let pct =
        |(r, t): (usize, usize)| format!("{:.1}% ({r}/{t})", 100.0 * r as f64 / t.max(1) as f64);
    let forms: BTreeMap<&str, usize> = requests.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.form.as_str()).or_default() += 1;
        m
    });
    println!(
        "{n} requests ({}): {forms:?}; greedy, {MAX_TOKENS} tokens, {CONCURRENCY} at a time\n",
        data.display()
    );
    println!("| arm | accuracy | device s | device s per 1,000 requests | vs always-large | exact hits | semantic hits | wall s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let reference = per_1000(&large).max(1e-9);
    for a in [&large, &all_on] {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1}% | {} | {} | {:.0} |",
            a.name,
            pct(a.right(|_| true)),
            a.device_secs(),
            per_1000(a),
            100.0 * per_1000(a) / reference,
            a.hits("exact"),
            a.hits("semantic"),
            a.wall_secs
        );
    }
    let lookups: f64 = all_on
        .outcomes
        .iter()
        .filter_map(|o| o.cache.as_ref()?["lookup_device_time_ms"].as_f64())
        .sum::<f64>()
        / 1e3;
    println!(
        "\nDevice time saved: {:.1}%. Of the {:.1} s spent with everything on, {lookups:.1} s embedded messages for semantic lookups and {:.1} s generated the answers of the {} requests not answered from the cache.",
        100.0 * (1.0 - per_1000(&all_on) / reference),
        all_on.device_secs(),
        all_on.device_secs() - lookups,
        n - all_on.hits("exact") - all_on.hits("semantic")
    );
    // Where the generated answers' device time went: kept by the cheap model, or escalated (both
    // models generated), by the router's decision.
    let mut by_route: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for o in all_on.outcomes.iter().filter(|o| hit_kind(o).is_none()) {
        let route = o.route.as_ref().map_or_else(
            || "no route".to_string(),
            |r| {
                let tried = r["tried"].as_array().map_or(0, Vec::len);
                format!(
                    "{} after {tried} model(s)",
                    r["model"].as_str().unwrap_or("?")
                )
            },
        );
        let e = by_route.entry(route).or_default();
        e.0 += 1;
        e.1 += o.device_ms / 1e3;
    }
    println!("\nGenerated answers by the model that answered (device s, lookups included):");
    for (route, (count, secs)) in &by_route {
        println!("- {route}: {count} requests, {secs:.1} s");
    }
    println!("\nBy form (accuracy always-large / all on; hits exact + semantic of all on):");
    for form in forms.keys() {
        let pick = |i: usize| requests[i].form == *form;
        let hits = (0..n)
            .filter(|&i| pick(i) && hit_kind(&all_on.outcomes[i]).is_some())
            .count();
        println!(
            "- {form}: {} / {}; {hits} hits",
            pct(large.right(pick)),
            pct(all_on.right(pick))
        );
    }
    // A semantic hit whose answer is wrong where the request's own words, asked of the large
    // model, were answered right: the cost of a false hit, if any.
    let wrong_hits = (0..n)
        .filter(|&i| {
            let o = &all_on.outcomes[i];
            hit_kind(o) == Some("semantic") && !o.right && large.outcomes[i].right
        })
        .count();
    println!("\nSemantic hits answered wrong where always-large was right: {wrong_hits}.");
    // A semantic hit takes the answer of an earlier request; when that was another question, its
    // rightness can differ from the question's own first answer: an upper bound on false hits.
    let mut first_right = BTreeMap::new();
    for (r, o) in requests.iter().zip(&all_on.outcomes) {
        if r.form == "first" {
            first_right.insert(r.item, o.right);
        }
    }
    let semantic: Vec<usize> = (0..n)
        .filter(|&i| hit_kind(&all_on.outcomes[i]) == Some("semantic"))
        .collect();
    let differ = semantic
        .iter()
        .filter(|&&i| first_right.get(&requests[i].item) != Some(&all_on.outcomes[i].right))
        .count();
    println!(
        "Semantic hits whose rightness differs from their question's first answer (at most this many took another question's answer): {differ}/{}.",
        semantic.len()
    );
    // A question's first ask has no earlier ask of its own: a hit there is always another
    // question's answer, whatever its rightness.
    let first_hits = semantic
        .iter()
        .filter(|&&i| requests[i].form == "first")
        .count();
    println!(
        "First asks answered from the cache (each took another question's answer): {first_hits}."
    );
    Ok(())
}
