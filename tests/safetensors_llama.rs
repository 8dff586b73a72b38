//! The safetensors (Hugging Face layout) Llama loader, checked against the GGUF path on the same
//! weights: SmolLM2's GGUF is converted here into a Hugging Face checkpoint (bf16 safetensors,
//! config.json, tokenizer.json), with the Q/K rows un-permuted back to the HF rotary layout.
//!
//! The GGUF path quantizes activations to 8 bits before each 4-bit matmul; the safetensors path
//! multiplies in f32 by the dequantized (then bf16-rounded) weights. So logits differ by quantization
//! noise: we require the same argmax on every prompt and |diff| < 2.0 (logits span ~40).
mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use hearth::model::{AttentionBackend, Model};

/// Undo llama.cpp's permutation of Q/K rows (HF halves layout -> GGUF interleaved layout).
fn unpermute(w: &Tensor, n_head: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((n_head, out / n_head / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn convert(gguf: &std::path::Path, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut f = std::fs::File::open(gguf).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let dev = Device::Cpu;
    let mut get = |name: &str| {
        ct.tensor(&mut f, name, &dev)
            .unwrap()
            .dequantize(&dev)
            .unwrap()
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    out.insert(
        "model.embed_tokens.weight".into(),
        bf16(get("token_embd.weight")),
    );
    out.insert("model.norm.weight".into(), bf16(get("output_norm.weight")));
    for i in 0..30 {
        let p = format!("model.layers.{i}");
        let b = format!("blk.{i}");
        let pairs = [
            ("self_attn.q_proj", "attn_q", Some(9)),
            ("self_attn.k_proj", "attn_k", Some(3)),
            ("self_attn.v_proj", "attn_v", None),
            ("self_attn.o_proj", "attn_output", None),
            ("mlp.gate_proj", "ffn_gate", None),
            ("mlp.up_proj", "ffn_up", None),
            ("mlp.down_proj", "ffn_down", None),
            ("input_layernorm", "attn_norm", None),
            ("post_attention_layernorm", "ffn_norm", None),
        ];
        for (hf, gg, heads) in pairs {
            let mut t = get(&format!("{b}.{gg}.weight"));
            if let Some(h) = heads {
                t = unpermute(&t, h);
            }
            out.insert(format!("{p}.{hf}.weight"), bf16(t));
        }
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "num_hidden_layers": 30, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "vocab_size": 49152, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let m = Model::load(gguf, "gguf", &Device::Cpu).unwrap();
    m.tokenizer.save_json(&dir.join("tokenizer.json")).unwrap();
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn safetensors_checkpoint_matches_the_gguf_it_came_from() {
    let dir = std::env::temp_dir().join(format!("hearth-st-{}", std::process::id()));
    convert(&common::smollm2(), &dir);
    let st =
        Model::load(&PathBuf::from(&dir), "st", &Device::Cpu).expect("safetensors model loads");
    let gg = common::load(&common::smollm2());
    assert_eq!(st.decoder.cfg.n_layers, 30);
    for prompt in common::PROMPTS {
        let ids = gg.tokenizer.encode(prompt).unwrap();
        assert_eq!(
            st.tokenizer.encode(prompt).unwrap(),
            ids,
            "tokenizer.json round trip"
        );
        let a = common::last_logits(&st, &ids, AttentionBackend::Cpu);
        let b = common::last_logits(&gg, &ids, AttentionBackend::Cpu);
        let diff = common::max_abs_diff(&a, &b);
        assert_eq!(argmax(&a), argmax(&b), "{prompt:?} (max diff {diff})");
        assert!(diff < 2.0, "{prompt:?}: max logit diff {diff}");
    }
    // The fused Q|K|V and gate|up projections (what a GPU load uses) give the same logits.
    let fused =
        hearth::loader::safetensors::load_with(&PathBuf::from(&dir), "fused", &Device::Cpu, true)
            .expect("fused load");
    for prompt in common::PROMPTS {
        let ids = st.tokenizer.encode(prompt).unwrap();
        let a = common::last_logits(&st, &ids, AttentionBackend::Cpu);
        let b = common::last_logits(&fused, &ids, AttentionBackend::Cpu);
        let diff = common::max_abs_diff(&a, &b);
        assert!(diff < 1e-3, "{prompt:?}: fused vs separate max diff {diff}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn incomplete_checkpoints_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("hearth-st-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = Model::load(&dir, "x", &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["MambaForCausalLM"], "hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 1, "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "vocab_size": 8}"#).unwrap();
    let err = Model::load(&dir, "x", &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("Mamba"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
