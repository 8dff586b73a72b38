//! Answer-quality signals (`metrics.quality`) over real HTTP on SmolLM2, checked against the
//! response's own log-probabilities: the mean, 10th percentile and lowest token log-probability
//! equal those of the returned tokens, the mean top-1 / top-2 gap equals that of the returned top
//! log-probabilities, and the entropy is at least the part the top five account for. A greedy
//! request without log-probabilities (the argmax computed with the logits, no row read back)
//! reports the same signals as with them (the whole row read back).
mod common;

use common::TestServer;
use serde_json::{json, Value};

const MODEL: &str = "quality-smol";

fn ask(s: &TestServer, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name three colors of the rainbow."}],
        "max_tokens": 20,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (code, v, _) = common::call(&s.base, "POST", "/v1/chat/completions", None, Some(&body));
    assert_eq!(code, 200, "{v}");
    v
}

#[test]
fn quality_signals_agree_with_the_returned_logprobs() {
    let s = TestServer::named(MODEL, |_| {});
    let with = ask(&s, json!({"logprobs": true, "top_logprobs": 5}));
    let q = &with["metrics"]["quality"];
    let content = with["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let n = content.len();
    assert!(n > 0);
    assert_eq!(q["tokens"].as_u64().unwrap() as usize, n);
    assert_eq!(
        with["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        n
    );
    let mut lps: Vec<f64> = content
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    let mean = lps.iter().sum::<f64>() / n as f64;
    assert!(
        (q["mean_logprob"].as_f64().unwrap() - mean).abs() < 1e-4,
        "{q}"
    );
    lps.sort_by(f64::total_cmp);
    assert!((q["min_logprob"].as_f64().unwrap() - lps[0]).abs() < 1e-5);
    assert!((q["p10_logprob"].as_f64().unwrap() - lps[(n - 1) / 10]).abs() < 1e-5);
    let tops: Vec<Vec<f64>> = content
        .iter()
        .map(|t| {
            t["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["logprob"].as_f64().unwrap())
                .collect()
        })
        .collect();
    let margin = tops.iter().map(|t| t[0] - t[1]).sum::<f64>() / n as f64;
    assert!(
        (q["mean_margin"].as_f64().unwrap() - margin).abs() < 1e-3,
        "{q} vs {margin}"
    );
    // The top five's share of the entropy is a lower bound; the uniform distribution over the
    // vocabulary an upper one.
    let partial = tops
        .iter()
        .map(|t| -t.iter().map(|lp| lp.exp() * lp).sum::<f64>())
        .sum::<f64>()
        / n as f64;
    let entropy = q["mean_entropy"].as_f64().unwrap();
    assert!(
        entropy >= partial - 1e-4 && entropy <= (49152f64).ln(),
        "{entropy} vs {partial}"
    );
    let length = with["choices"][0]["finish_reason"] == "length";
    assert_eq!(q["stopped_on_length"].as_bool().unwrap(), length);
    assert!((0.0..=1.0).contains(&q["repetition"].as_f64().unwrap()));

    // The same greedy request without log-probabilities takes the device's argmax path.
    let plain = ask(&s, json!({}));
    assert_eq!(
        plain["choices"][0]["message"]["content"],
        with["choices"][0]["message"]["content"]
    );
    let p = &plain["metrics"]["quality"];
    for field in [
        "mean_logprob",
        "p10_logprob",
        "min_logprob",
        "mean_entropy",
        "mean_margin",
    ] {
        let (a, b) = (p[field].as_f64().unwrap(), q[field].as_f64().unwrap());
        assert!((a - b).abs() < 1e-3, "{field}: {a} vs {b}");
    }
    // Each response is one observation in the model's histograms.
    let count = s
        .metric(&format!(
            "hearth_response_mean_logprob_count{{model=\"{MODEL}\",route=\"\"}}"
        ))
        .unwrap();
    assert!(count >= 2.0, "{count}");
    // ... and in the model's last-hour window of the drift gauges.
    let hour = s
        .metric(&format!(
            "hearth_quality_window_responses{{model=\"{MODEL}\",window=\"1h\"}}"
        ))
        .unwrap();
    assert!(hour >= 2.0, "{hour}");
}

#[test]
fn the_ledger_keeps_each_responses_signals() {
    let dir = std::env::temp_dir().join(format!("hearth-quality-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("usage.sqlite3");
    let p = path.clone();
    let s = TestServer::named("quality-ledger", move |c| c.ledger_path = Some(p));
    let mut body = json!({
        "model": "quality-ledger",
        "messages": [{"role": "user", "content": "Count from one to five."}],
        "max_tokens": 6,
        "temperature": 0,
    });
    let (code, v, _) = common::call(&s.base, "POST", "/v1/chat/completions", None, Some(&body));
    assert_eq!(code, 200, "{v}");
    body["max_tokens"] = json!(1);
    let (code, _, _) = common::call(&s.base, "POST", "/v1/chat/completions", None, Some(&body));
    assert_eq!(code, 200);
    drop(s);
    let c = rusqlite::Connection::open(&path).unwrap();
    let rows: Vec<(f64, f64, bool)> = c
        .prepare("SELECT mean_logprob, mean_entropy, length_stop FROM requests ORDER BY ts_ms")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 2);
    let q = &v["metrics"]["quality"];
    assert!((rows[0].0 - q["mean_logprob"].as_f64().unwrap()).abs() < 1e-9);
    assert!((rows[0].1 - q["mean_entropy"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(rows[0].2, q["stopped_on_length"].as_bool().unwrap());
    // One token of at most one: stopped on length.
    assert!(rows[1].2);
    let _ = std::fs::remove_dir_all(&dir);
}
