//! The router over real models and real HTTP (SmolLM2 as `small`, Gemma 3 as `large`): `auto`
//! exists by default, cheapest model first; the cascade keeps the small model's answer exactly or
//! escalates to exactly the large model's own greedy answer; held-back tokens are never replaced in
//! a stream; the discarded attempt's device time is charged; routes are checked at start-up.
mod common;

use common::TestServer;
use hearth::router::{Policy, RouteConfig, Thresholds};
use serde_json::{json, Value};

fn route(name: &str, models: [&str; 2], escalate_below: Thresholds) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        probe_tokens: 4,
        escalate_below,
        ..Default::default()
    }
}

/// Always keeps the small model (no signal is below these), and always escalates.
const KEEP: Thresholds = Thresholds {
    logprob_p10: -1e9,
    margin_p25: -1.0,
};
const ESCALATE: Thresholds = Thresholds {
    logprob_p10: 1.0,
    margin_p25: 1e9,
};

/// SmolLM2 and Gemma 3 under the given names (metrics are process-wide: a test that reads them
/// uses names of its own), with the groups `keep` and `escalate` over them.
fn server(small: &str, large: &str) -> TestServer {
    TestServer::start(hearth::config::Config {
        models: common::both_models(small, large),
        routes: vec![
            route("keep", [small, large], KEEP),
            route("escalate", [small, large], ESCALATE),
        ],
        ..Default::default()
    })
}

/// JSON body and the `x-hearth-route` header.
fn complete(base: &str, body: &Value) -> (Value, Option<String>) {
    let mut r = common::agent()
        .post(&format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("request sent");
    assert_eq!(r.status().as_u16(), 200);
    let route = r
        .headers()
        .get("x-hearth-route")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let v = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    (v, route)
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// A streamed completion's text and its chunks.
fn streamed(base: &str, body: &Value) -> (String, Vec<Value>) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let cs = chunks(base, &body);
    let text = cs
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    (text, cs)
}

/// The streamed chunks (JSON), without `[DONE]`.
fn chunks(base: &str, body: &Value) -> Vec<Value> {
    common::sse(base, "/v1/completions", body)
        .into_iter()
        .filter(|d| d != "[DONE]")
        .map(|d| serde_json::from_str(&d).unwrap())
        .collect()
}

#[test]
fn the_cascade_keeps_or_escalates_to_exactly_each_models_own_answer() {
    let s = server("small", "large");
    let prompt = "Question: What is the capital of Japan?\nAnswer:";
    let ask = |model: &str| json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (small, _) = complete(&s.base, &ask("small"));
    let (large, _) = complete(&s.base, &ask("large"));
    assert!(
        small["metrics"].get("route").is_none(),
        "a model asked by name is not routed"
    );

    // Kept: the small model's own answer, named as its.
    let (kept, header) = complete(&s.base, &ask("keep"));
    assert_eq!(text(&kept), text(&small));
    assert_eq!(kept["model"], "small");
    let r = &kept["metrics"]["route"];
    assert_eq!(r["group"], "keep");
    assert_eq!(r["escalated"], false);
    assert_eq!(r["reason"], "confident");
    assert_eq!(r["signals"]["tokens"], 4, "{r}");
    assert_eq!(header.as_deref(), Some("keep:small"));

    // Escalated: exactly the large model's greedy answer, and the small attempt is charged.
    let (esc, header) = complete(&s.base, &ask("escalate"));
    assert_eq!(text(&esc), text(&large));
    assert_eq!(esc["model"], "large");
    let r = &esc["metrics"]["route"];
    assert_eq!(r["escalated"], true, "{r}");
    assert_eq!(r["tried"], json!(["small", "large"]));
    assert_eq!(r["escalated_at_token"], 4);
    assert_eq!(
        header.as_deref(),
        Some("escalate:large escalated(low_logprob)")
    );
    assert_eq!(esc["usage"]["completion_tokens"], 12);

    // Streams: the held-back tokens come out once, never replaced; chunks name the answering model.
    for (group, want, model) in [
        ("keep", text(&small), "small"),
        ("escalate", text(&large), "large"),
    ] {
        let (text, cs) = streamed(&s.base, &ask(group));
        assert_eq!(text, want, "{group}");
        assert!(cs.iter().all(|c| c["model"] == model), "{group}: {cs:?}");
        let last = cs.last().unwrap();
        assert_eq!(last["metrics"]["route"]["model"], model);
    }
}

#[test]
fn an_escalated_requests_device_time_includes_the_discarded_attempt() {
    let s = server("meter-small", "meter-large");
    let read = |m: &str| {
        s.metric(&format!(
            "hearth_tenant_device_seconds_total{{tenant=\"default\",model=\"{m}\"}}"
        ))
        .unwrap_or(0.0)
    };
    let before = read("meter-small") + read("meter-large");
    let (v, _) = complete(
        &s.base,
        &json!({"model": "escalate", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
    );
    let used = read("meter-small") + read("meter-large") - before;
    let billed = v["metrics"]["device_time_ms"].as_f64().unwrap() / 1e3;
    assert!(read("meter-small") > 0.0, "the small model ran");
    let escalations = s.metric(
        "hearth_router_escalations_total{route=\"escalate\",from=\"meter-small\",to=\"meter-large\",reason=\"low_logprob\"}",
    );
    assert_eq!(escalations, Some(1.0));
    assert!(
        (billed - used).abs() <= 0.01 * used,
        "response bills {billed:.6} s, the engines ran {used:.6} s for it"
    );
}

#[test]
fn auto_exists_by_default_and_bad_routes_are_refused() {
    let s = TestServer::start(hearth::config::Config {
        models: common::both_models("small", "large"),
        ..Default::default()
    });
    let (st, models) = common::get(&s.base, "/v1/models");
    assert_eq!(st, 200);
    assert_eq!(models["data"][2]["id"], "auto");
    let (v, _) = complete(
        &s.base,
        &json!({"model": "auto", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(
        v["metrics"]["route"]["tried"][0], "small",
        "cheapest first: {v}"
    );
    let (st, err, _) = common::post(
        &s.base,
        "/v1/completions",
        &json!({"model": "autox", "prompt": "x"}).to_string(),
    );
    assert_eq!(st, 404, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found");

    // A route naming a model that is not served is a start-up error.
    let mut bad = hearth::config::Config {
        models: common::both_models("small", "large"),
        routes: vec![RouteConfig {
            models: vec!["small".into(), "huge".into()],
            ..route("fast", ["small", "large"], KEEP)
        }],
        port: 0,
        ..Default::default()
    };
    bad.ledger_path = None;
    let err =
        s.rt.block_on(hearth::server::Server::start(bad, candle_core::Device::Cpu));
    assert!(
        matches!(&err, Err(hearth::HearthError::Config(m)) if m.contains("huge")),
        "{:?}",
        err.err()
    );
}

#[test]
fn rules_pick_the_model_before_the_cascade() {
    let mut ruled = route("ruled", ["small", "large"], KEEP);
    ruled.rules = vec![
        hearth::router::RuleConfig {
            model: "large".into(),
            pattern: Some(r"(?i)\btranslate\b".into()),
            ..Default::default()
        },
        hearth::router::RuleConfig {
            model: "large".into(),
            min_prompt_tokens: Some(40),
            ..Default::default()
        },
        hearth::router::RuleConfig {
            model: "small".into(),
            tenant: Some("someone-else".into()),
            ..Default::default()
        },
    ];
    let s = TestServer::start(hearth::config::Config {
        models: common::both_models("small", "large"),
        routes: vec![ruled],
        ..Default::default()
    });
    let ask = |prompt: &str| {
        complete(
            &s.base,
            &json!({"model": "ruled", "prompt": prompt, "max_tokens": 3, "temperature": 0}),
        )
        .0
    };
    let v = ask("Translate the word cat into French:");
    assert_eq!(v["model"], "large");
    assert_eq!(v["metrics"]["route"]["reason"], "rule_0");
    assert!(v["metrics"]["route"]["signals"].is_null(), "no cascade ran");
    let v = ask(&"The committee met again to review the figures. ".repeat(6));
    assert_eq!(v["model"], "large");
    assert_eq!(v["metrics"]["route"]["reason"], "rule_1");
    // No rule matches (the third is another tenant's): the cascade, which keeps the small model.
    let v = ask("The capital of France is");
    assert_eq!(v["model"], "small");
    assert_eq!(v["metrics"]["route"]["reason"], "confident");
}

#[test]
fn the_load_policy_skips_a_model_whose_queue_breaks_the_ttft_target() {
    // Far below the flood's prefill on any machine, far above an idle prompt's: the flood drains
    // while the groups are asked, and a fast CI machine once drained four prompts below 500 ms.
    let target = 250;
    let s = TestServer::start(hearth::config::Config {
        models: common::both_models("busy-small", "busy-large"),
        routes: vec![
            RouteConfig {
                policy: Policy::Load,
                ttft_target_ms: Some(target),
                ..route("spill", ["busy-small", "busy-large"], KEEP)
            },
            RouteConfig {
                ttft_target_ms: Some(target),
                ..route("watched", ["busy-small", "busy-large"], KEEP)
            },
            RouteConfig {
                policy: Policy::Rules,
                ttft_target_ms: Some(target),
                ..route("plain", ["busy-small", "busy-large"], KEEP)
            },
        ],
        ..Default::default()
    });
    let ask = |group: &str| {
        complete(
            &s.base,
            &json!({"model": group, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}),
        )
        .0
    };
    // Idle: the cheapest model; the load policy decides nothing else.
    let v = ask("spill");
    assert_eq!(v["model"], "busy-small", "{v}");
    let r = &v["metrics"]["route"];
    assert_eq!(r["reason"], "first_model", "{r}");
    assert_eq!(r["policy"], "load");
    assert!(r["signals"].is_null(), "no cascade ran: {r}");
    assert_eq!(r["load"][0]["fits"], true, "{r}");

    // Eight long prompts queue on the small model, thousands of tokens of prefill ahead.
    let filler = "the river ran past the old mill and on into the town ".repeat(60);
    let flood: Vec<_> = (0..8)
        .map(|i| {
            let base = s.base.clone();
            let body =
                json!({"model": "busy-small", "prompt": format!("{i} {filler}"), "max_tokens": 1});
            std::thread::spawn(move || common::post(&base, "/v1/completions", &body.to_string()).0)
        })
        .collect();
    let queued = |m: &str| {
        s.metric(&format!("hearth_num_requests_waiting{{model=\"{m}\"}}"))
            .unwrap_or(0.0)
            + s.metric(&format!("hearth_num_requests_running{{model=\"{m}\"}}"))
                .unwrap_or(0.0)
    };
    let t0 = std::time::Instant::now();
    while queued("busy-small") < 8.0 {
        assert!(t0.elapsed().as_secs() < 120, "the flood never queued");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for group in ["spill", "watched"] {
        let v = ask(group);
        let r = &v["metrics"]["route"];
        assert_eq!(v["model"], "busy-large", "{group}: {r}");
        assert_eq!(r["reason"], "load", "{group}: {r}");
        assert_eq!(
            r["tried"],
            json!(["busy-large"]),
            "{group}: the small one never ran"
        );
        let small = &r["load"][0];
        assert_eq!(small["model"], "busy-small");
        assert_eq!(small["fits"], false, "{group}: {r}");
        assert!(
            !small["kv_room"].as_bool().unwrap()
                || small["ttft_ms"].as_f64().unwrap() > target as f64,
            "{group}: {r}"
        );
    }
    // Policy `rules` weighs no load: the first model, however busy.
    let v = ask("plain");
    assert_eq!(v["model"], "busy-small");
    assert_eq!(v["metrics"]["route"]["reason"], "first_model");
    assert_eq!(v["metrics"]["route"]["load"], json!([]));

    for f in flood {
        assert_eq!(f.join().unwrap(), 200);
    }
    // Drained: the small model fits again.
    let v = ask("spill");
    assert_eq!(v["model"], "busy-small", "{v}");
    assert_eq!(v["metrics"]["route"]["load"][0]["fits"], true);
}

#[test]
fn a_response_not_streamed_may_escalate_at_a_later_window_and_a_stream_never_does() {
    let prompt = "The capital of France is";
    let ask = |model: &str, logprobs: bool| {
        let mut b = json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
        if logprobs {
            b["logprobs"] = json!(1);
        }
        b
    };
    // The small model's own token log-probabilities, read in windows of two tokens.
    let (small, large) = {
        let s = TestServer::start(hearth::config::Config {
            models: common::both_models("small", "large"),
            ..Default::default()
        });
        (
            complete(&s.base, &ask("small", true)).0,
            complete(&s.base, &ask("large", false)).0,
        )
    };
    let lp: Vec<f32> = small["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let window_min = |w: usize| {
        lp[2 * w..2 * w + 2]
            .iter()
            .copied()
            .fold(f32::MAX, f32::min)
    };
    // Just under the first window's least sure token: the first window passes, and the first
    // later window holding a less sure token escalates.
    let threshold = window_min(0) - 1e-3;
    let late = (1..4)
        .find(|&w| window_min(w) < threshold)
        .expect("the prompt's answer has a less sure token after its first two");

    let s = TestServer::start(hearth::config::Config {
        models: common::both_models("small", "large"),
        routes: vec![RouteConfig {
            probe_tokens: 2,
            watch_tokens: 8,
            ..route(
                "watched",
                ["small", "large"],
                Thresholds {
                    logprob_p10: threshold,
                    margin_p25: -1e9,
                },
            )
        }],
        ..Default::default()
    });
    let (v, header) = complete(&s.base, &ask("watched", false));
    let r = &v["metrics"]["route"];
    assert_eq!(r["escalated"], true, "{r}");
    assert_eq!(r["escalated_at_token"], 2 * (late + 1), "{r}");
    assert_eq!(
        text(&v),
        text(&large),
        "exactly the large model's own answer"
    );
    assert_eq!(
        header.as_deref(),
        Some("watched:large escalated(low_logprob)")
    );

    // Streamed, the first window's tokens go out once it is read: no later escalation.
    let (streamed_text, cs) = streamed(&s.base, &ask("watched", false));
    assert_eq!(streamed_text, text(&small));
    let r = &cs.last().unwrap()["metrics"]["route"];
    assert_eq!(r["escalated"], false, "{r}");
    assert_eq!(r["reason"], "confident");
}
