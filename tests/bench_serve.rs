//! `hearth bench --suite serve` against a real Hearth server: every request is counted, the
//! percentiles are in order, and the chart and JSON are written.
mod common;

use common::TestServer;
use hearth::bench::serve::{plot, run, table, ServePlan, ServerRun};

#[test]
fn the_load_generator_counts_every_token_and_draws_the_chart() {
    let s = TestServer::smol(|_| {});
    let plan = ServePlan {
        model: "smol".into(),
        levels: vec![1, 3],
        requests: 4,
        max_tokens: 6,
        prompt_tokens: 40,
        ignore_eos: true,
        api_key: None,
    };
    let r = run(&format!("hearth={}", s.base), &plan).unwrap();
    assert_eq!(r.label, "hearth");
    assert_eq!(r.levels.len(), 2);
    for l in &r.levels {
        assert_eq!((l.requests, l.failed), (4, 0), "{l:?}");
        assert_eq!(
            l.output_tokens,
            4 * 6,
            "ignore_eos: every request gives max_tokens"
        );
        assert!(
            l.mean_prompt_tokens > 30.0 && l.mean_prompt_tokens < 80.0,
            "{l:?}"
        );
        assert!(
            l.ttft_ms.p50 > 0.0 && l.ttft_ms.p50 <= l.ttft_ms.p90,
            "{l:?}"
        );
        assert!(l.itl_ms.p50 > 0.0 && l.itl_ms.p90 <= l.itl_ms.p99, "{l:?}");
        assert!(l.output_tok_s > 0.0);
        // The generator itself sleeps in reads: far below one core.
        assert!(l.client_cpu < 0.5, "{l:?}");
    }
    // `--json` output reads back (`--from`) as it was written.
    let text = serde_json::to_string(std::slice::from_ref(&r)).unwrap();
    let back: Vec<ServerRun> = serde_json::from_str(&text).unwrap();
    assert_eq!(table(&back), table(std::slice::from_ref(&r)));
    let t = table(std::slice::from_ref(&r));
    assert_eq!(t.lines().count(), 4, "{t}");
    let dir = std::env::temp_dir().join(format!("hearth-serve-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("chart.svg");
    plot(&[r.clone(), r], &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("hearth"),
        "{}",
        &text[..200.min(text.len())]
    );
    std::fs::remove_dir_all(&dir).ok();

    // A server that refuses: counted as failed, not as tokens.
    let bad = ServePlan {
        model: "no-such-model".into(),
        levels: vec![2],
        requests: 2,
        ..plan
    };
    let r = run(&s.base, &bad).unwrap();
    assert_eq!((r.levels[0].failed, r.levels[0].output_tokens), (2, 0));
}
