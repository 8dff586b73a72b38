//! Batch invariance and CPU independence where users see them: greedy completions with logprobs from
//! the HTTP server are bit-identical whether a request runs alone or among 4 or 16 concurrent ones,
//! on both default models; and a model's logits do not change with the SIMD tier the CPU offers.
//!
//! Both would have caught what candle 0.11's run-time kernel selection did: Q6K weights (Gemma)
//! took a repacked kernel from two rows on, so a decode step alone and in a batch differed from the
//! second generated token; and on CPUs with AVX512-VNNI, Q8_0 and Q4K weights took kernels with
//! another activation quantization than on AVX2 CPUs.
mod common;

use common::{post, TestServer};
use serde_json::json;

/// Prompts of different lengths (5 to ~300 tokens), so prefill chunks and decodes share steps.
fn prompts() -> Vec<String> {
    let base = [
        "The capital of France is",
        "Here is a short poem about the sea:\n",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Question: What is 17 times 23?\nAnswer:",
        "In 1492, Columbus sailed across the Atlantic Ocean. The voyage",
        "List three uses of copper:",
        "The quick brown fox",
        "Once upon a time, in a small village by the mountains,",
    ];
    (0..16)
        .map(|i| {
            let p = base[i % base.len()];
            // Every second prompt is long: the same text repeated with a distinct prefix.
            if i % 2 == 1 {
                format!("Note {i}. {}", p.repeat(1 + i * 2))
            } else {
                format!("{i}. {p}")
            }
        })
        .collect()
}

/// Text and per-token logprobs of a greedy completion.
fn complete(base: &str, model: &str, prompt: &str) -> (String, Vec<f64>) {
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
        "ignore_eos": true, "logprobs": 2,
    });
    let (status, v, _) = post(base, "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    let lps: Vec<f64> = c["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect();
    assert_eq!(lps.len(), 12, "{v}");
    (c["text"].as_str().unwrap_or_default().to_string(), lps)
}

#[test]
fn both_models_give_the_same_bits_alone_and_among_4_and_16_concurrent_requests() {
    let cfg = hearth::config::Config {
        models: common::both_models("smol", "gemma"),
        // A small step budget so long prompts are chunked and share steps with decodes.
        max_batch_tokens: 128,
        ..Default::default()
    };
    let s = TestServer::start(cfg);
    let prompts = prompts();
    for model in ["smol", "gemma"] {
        let alone: Vec<(String, Vec<f64>)> = prompts
            .iter()
            .map(|p| complete(&s.base, model, p))
            .collect();
        for concurrent in [4usize, 16] {
            let together: Vec<(String, Vec<f64>)> = std::thread::scope(|scope| {
                let handles: Vec<_> = prompts[..concurrent]
                    .iter()
                    .map(|p| scope.spawn(|| complete(&s.base, model, p)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
                assert_eq!(
                    a, t,
                    "{model}, prompt {i}, {concurrent} concurrent: alone vs batched"
                );
            }
        }
    }
}

/// candle picks CPU kernels by the SIMD tier it detects at run time; its variables
/// `MISTRALRS_FORCE_AVX2` / `MISTRALRS_FORCE_AVXVNNI` make it act as on an older CPU, and
/// `HEARTH_CPU_TIER=avx2` pins Hearth's own tiled kernels to AVX2 (their AVX-512 VNNI tier is
/// built to give the same bits). Hearth's logits must be the same bits under each (on a CPU
/// without VNNI every run takes the AVX2 tier, and this checks nothing more than determinism).
#[test]
fn logits_do_not_depend_on_the_cpu_simd_tier() {
    let dir = std::env::temp_dir().join(format!("hearth-tiers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.json");
    // Two prompts of 40 and 24 tokens: batched prefill, cached prefill and decode rows.
    let ids: Vec<Vec<u32>> = vec![(100..140).collect(), (2000..2024).collect()];
    std::fs::write(&prompts, serde_json::to_string(&ids).unwrap()).unwrap();
    for model in [common::smollm2(), common::gemma3()] {
        let run = |tier: Option<(&str, &str)>| -> Vec<u8> {
            let out = dir.join("logits.bin");
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"));
            cmd.args(["logits", "--device", "cpu", "--model"])
                .arg(&model)
                .arg("--prompts")
                .arg(&prompts)
                .arg("--out")
                .arg(&out)
                .env_remove("MISTRALRS_FORCE_AVX2")
                .env_remove("MISTRALRS_FORCE_AVXVNNI")
                .env_remove("HEARTH_CPU_TIER");
            if let Some((k, v)) = tier {
                cmd.env(k, v);
            }
            let st = cmd.status().expect("hearth logits runs");
            assert!(st.success(), "hearth logits failed under {tier:?}");
            std::fs::read(&out).unwrap()
        };
        let native = run(None);
        assert!(!native.is_empty());
        for tier in [
            ("MISTRALRS_FORCE_AVX2", "1"),
            ("MISTRALRS_FORCE_AVXVNNI", "1"),
            ("HEARTH_CPU_TIER", "avx2"),
        ] {
            assert!(
                run(Some(tier)) == native,
                "{}: logits differ under {tier:?}",
                model.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
