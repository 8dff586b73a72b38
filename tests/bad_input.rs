//! Bad input gives a clear error, never a panic: unknown architecture, missing or truncated file,
//! prompts that are empty or do not fit the context.
mod common;

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hearth::engine::{EngineConfig, Request, SamplingParams};
use hearth::model::Model;
use hearth::HearthError;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hearth-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn missing_file_is_a_clear_error() {
    let err =
        Model::load(&PathBuf::from("/nonexistent/model.gguf"), "x", &Device::Cpu).unwrap_err();
    assert!(matches!(err, HearthError::ModelNotFound(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn truncated_file_is_a_clear_error() {
    let src = std::fs::read(common::smollm2()).unwrap();
    for keep in [100usize, 2_000_000, src.len() - 1000] {
        let p = scratch(&format!("truncated-{keep}.gguf"));
        std::fs::write(&p, &src[..keep]).unwrap();
        let err = Model::load(&p, "x", &Device::Cpu).unwrap_err();
        assert!(
            matches!(err, HearthError::ModelFile { .. }),
            "{keep}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("truncated") || msg.contains("not a readable GGUF"),
            "{msg}"
        );
    }
}

#[test]
fn not_a_gguf_file_is_a_clear_error() {
    let p = scratch("garbage.gguf");
    std::fs::write(&p, b"this is not a model at all").unwrap();
    let err = Model::load(&p, "x", &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("not a readable GGUF"), "{err}");
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let p = scratch("unknown-arch.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("mamba".into());
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
    drop(f);
    let err = Model::load(&p, "x", &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, HearthError::UnsupportedArchitecture(ref a) if a == "mamba"),
        "{err}"
    );
    assert!(err.to_string().contains("mamba"));
}

#[test]
fn bad_prompts_are_refused_at_submission() {
    let e = common::engine(&common::smollm2(), EngineConfig::default());
    let req = |prompt: Vec<u32>, max_tokens: Option<usize>| Request {
        tenant: None,
        weight: 1,
        constraint: None,
        prompt,
        params: SamplingParams {
            max_tokens,
            ..SamplingParams::greedy()
        },
    };
    let err = e.submit(req(vec![], Some(4))).unwrap_err();
    assert!(matches!(err, HearthError::InvalidRequest(_)), "{err}");

    let ctx = e.max_context;
    let err = e.submit(req(vec![1; ctx + 10], Some(4))).unwrap_err();
    match err {
        HearthError::ContextLength { prompt, context } => {
            assert_eq!((prompt, context), (ctx + 10, ctx));
        }
        other => panic!("expected a context-length error, got {other}"),
    }
    assert!(e
        .submit(req(vec![1; 100], Some(ctx)))
        .unwrap_err()
        .to_string()
        .contains(&ctx.to_string()));
    let err = e.submit(req(vec![u32::MAX], Some(4))).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = e
        .submit(Request {
            tenant: None,
            weight: 1,
            constraint: None,
            prompt: vec![1, 2, 3],
            params: SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
        })
        .unwrap_err();
    assert!(matches!(err, HearthError::InvalidRequest(_)), "{err}");

    // A pool too small for prompt + max_tokens is refused up front rather than stalling forever.
    let small = common::engine(
        &common::smollm2(),
        EngineConfig {
            num_blocks: Some(4),
            ..Default::default()
        },
    );
    let err = small.submit(req(vec![1; 60], Some(10))).unwrap_err();
    assert!(
        matches!(
            err,
            HearthError::KvCapacity {
                needed: 5,
                total: 4
            }
        ),
        "{err}"
    );
    // And the engine still serves what fits.
    assert_eq!(common::greedy_n(&small, &[1, 2, 3], 4).len(), 4);
}
