//! What an inference gateway (the Gateway API Inference Extension's endpoint picker, llm-d's
//! router) reads from a Hearth replica: vLLM's gauges, labelled as vLLM labels them, moving with
//! the queue and the KV cache under load; and the `render` endpoints, whose token ids are exactly
//! the prompt the engine runs for the same request.
mod common;

use common::{agent, TestServer};
use hearth::tenancy::TenantConfig;
use serde_json::{json, Value};

const KEY: &str = "scale-key-1";

fn post(base: &str, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut rq = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json");
    if let Some(k) = key {
        rq = rq.header("authorization", &format!("Bearer {k}"));
    }
    let mut r = rq.send(body.to_string()).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn vllm_gauges_follow_the_queue_and_the_kv_cache() {
    let s = TestServer::named("gauge-smol", |c| {
        // Two running at most: the rest of the flood waits.
        c.max_seqs = 2;
    });
    let m = |name: &str| s.metric(&format!("{name}{{model_name=\"gauge-smol\"}}"));
    assert_eq!(m("vllm:num_requests_waiting"), Some(0.0));
    assert_eq!(m("vllm:num_requests_running"), Some(0.0));
    assert_eq!(m("vllm:kv_cache_usage_perc"), Some(0.0));
    let text = common::get_text(&s.base, "/metrics");
    let total = s
        .metric("hearth_kv_cache_total_blocks{model=\"gauge-smol\"}")
        .unwrap();
    let info = format!(
        "vllm:cache_config_info{{model_name=\"gauge-smol\",block_size=\"16\",num_gpu_blocks=\"{total}\"}} 1"
    );
    assert!(text.lines().any(|l| l == info), "no `{info}` in:\n{text}");

    let flood: Vec<_> = (0..6)
        .map(|i| {
            let base = s.base.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "gauge-smol", "prompt": format!("Story {i}: once upon a time"),
                                  "max_tokens": 48, "ignore_eos": true});
                common::post(&base, "/v1/completions", &body.to_string()).0
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let (mut saw_waiting, mut saw_usage) = (false, false);
    while !(saw_waiting && saw_usage) {
        assert!(t0.elapsed().as_secs() < 120, "the gauges never moved");
        let waiting = m("vllm:num_requests_waiting").unwrap();
        let running = m("vllm:num_requests_running").unwrap();
        let usage = m("vllm:kv_cache_usage_perc").unwrap();
        assert!(running <= 2.0);
        saw_waiting |= waiting >= 1.0 && running == 2.0;
        if running > 0.0 && usage > 0.0 {
            // The same quantity as Hearth's own gauge, in 0..1 (scraped a moment apart).
            assert!(usage <= 1.0);
            saw_usage = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    for f in flood {
        assert_eq!(f.join().unwrap(), 200);
    }
    common::wait_idle_http(&s.base, "gauge-smol");
    assert_eq!(m("vllm:num_requests_waiting"), Some(0.0));
    assert_eq!(m("vllm:num_requests_running"), Some(0.0));
    let usage = m("vllm:kv_cache_usage_perc").unwrap();
    let hearth = s
        .metric("hearth_kv_cache_usage_perc{model=\"gauge-smol\"}")
        .unwrap();
    assert_eq!(usage, hearth);
}

#[test]
fn render_gives_the_ids_the_engine_runs() {
    let s = TestServer::start(hearth::config::Config {
        models: common::both_models("render-small", "render-large"),
        tenants: vec![TenantConfig::new("render-team", &[KEY])],
        routes: vec![hearth::router::RouteConfig {
            name: "render-route".into(),
            models: vec!["render-small".into(), "render-large".into()],
            ..Default::default()
        }],
        ..Default::default()
    });
    let chat = json!({"model": "render-small", "max_tokens": 2, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three rivers of Europe."}]});
    let completion =
        json!({"model": "render-large", "max_tokens": 2, "prompt": "The three longest rivers are"});
    for (path, body) in [
        ("/v1/chat/completions", &chat),
        ("/v1/completions", &completion),
    ] {
        let (status, rendered) = post(&s.base, &format!("{path}/render"), Some(KEY), body);
        assert_eq!(status, 200, "{rendered}");
        let ids = rendered["token_ids"].as_array().unwrap();
        assert_eq!(rendered["model"], body["model"]);
        assert!(rendered["prompts"].is_null());
        let (status, answer) = post(&s.base, path, Some(KEY), body);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            ids.len() as u64,
            answer["usage"]["prompt_tokens"].as_u64().unwrap(),
            "{path}"
        );
        // Rendering again gives the same ids (and runs nothing: no new ledger row's tokens).
        let (_, again) = post(&s.base, &format!("{path}/render"), Some(KEY), body);
        assert_eq!(again["token_ids"], rendered["token_ids"]);
    }
    // The chat template is in the ids: the rendered chat is longer than its words alone.
    let (_, plain) = post(
        &s.base,
        "/v1/completions/render",
        Some(KEY),
        &json!({"model": "render-small", "prompt": "Name three rivers of Europe."}),
    );
    let (_, templated) = post(&s.base, "/v1/chat/completions/render", Some(KEY), &chat);
    assert!(
        templated["token_ids"].as_array().unwrap().len()
            > plain["token_ids"].as_array().unwrap().len() + 4
    );
    // Several prompts: the first's ids, and each prompt's.
    let (status, many) = post(
        &s.base,
        "/v1/completions/render",
        Some(KEY),
        &json!({"model": "render-small", "prompt": ["one two", "three four five"]}),
    );
    assert_eq!(status, 200);
    assert_eq!(many["prompts"].as_array().unwrap().len(), 2);
    assert_eq!(many["token_ids"], many["prompts"][0]);
    // A route group renders for the model that would run the request first.
    let (status, routed) = post(
        &s.base,
        "/v1/completions/render",
        Some(KEY),
        &json!({"model": "render-route", "prompt": "The three longest rivers are"}),
    );
    assert_eq!(status, 200, "{routed}");
    assert_eq!(routed["model"], "render-small");
    // Keys and validation as for the endpoints themselves.
    assert_eq!(
        post(&s.base, "/v1/chat/completions/render", None, &chat).0,
        401
    );
    let (status, err) = post(
        &s.base,
        "/v1/chat/completions/render",
        Some(KEY),
        &json!({"model": "render-small", "messages": []}),
    );
    assert_eq!(status, 400, "{err}");
    assert_eq!(
        post(
            &s.base,
            "/v1/completions/render",
            Some(KEY),
            &json!({"model": "no-such-model", "prompt": "x"})
        )
        .0,
        404
    );
}
