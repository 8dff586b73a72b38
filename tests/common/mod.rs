//! Shared helpers for the real-model tests: model paths and engine set-up.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

use candle_core::Device;
use hearth::engine::{Engine, EngineConfig, EngineHandle, Request, SamplingParams};
use hearth::model::Model;

pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("HEARTH_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    assert!(
        dir.join("smollm2-135m-instruct-q4_1.gguf").exists(),
        "models missing in {}: run scripts/fetch-models.sh",
        dir.display()
    );
    dir
}

pub fn smollm2() -> PathBuf {
    models_dir().join("smollm2-135m-instruct-q4_1.gguf")
}

pub fn gemma3() -> PathBuf {
    models_dir().join("gemma-3-270m-q4_k_m.gguf")
}

pub fn load(path: &Path) -> Model {
    Model::load(path, "test", &Device::Cpu).expect("model loads")
}

pub fn engine(path: &Path, cfg: EngineConfig) -> EngineHandle {
    Engine::start(load(path), cfg).expect("engine starts")
}

/// Greedy tokens for `prompt` (ids), `n` of them (fewer if EOS comes first).
pub fn greedy(e: &EngineHandle, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = SamplingParams {
        max_tokens: Some(n),
        ..SamplingParams::greedy()
    };
    let (toks, _, _) = e
        .generate(Request {
            tenant: None,
            prompt: prompt.to_vec(),
            params,
        })
        .expect("generation succeeds");
    toks.iter().map(|s| s.token).collect()
}

/// Greedy with EOS ignored, so every run yields exactly `n` tokens.
pub fn greedy_n(e: &EngineHandle, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let (toks, _, _) = e
        .generate(Request {
            tenant: None,
            prompt: prompt.to_vec(),
            params,
        })
        .expect("generation succeeds");
    toks.iter().map(|s| s.token).collect()
}

/// Wait (bounded) until the engine has no work; cancelled requests are reaped at the next step.
pub fn wait_idle(e: &EngineHandle) {
    let t0 = std::time::Instant::now();
    while !(e.is_idle() && e.free_blocks() == e.total_blocks()) {
        assert!(t0.elapsed().as_secs() < 120, "engine did not go idle");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

pub const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: What is 17 times 23?\nAnswer:",
    "In 1492, Columbus sailed across the Atlantic Ocean. The voyage",
];
