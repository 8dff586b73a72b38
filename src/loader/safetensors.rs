//! Hugging Face Llama checkpoints: a folder with config.json, tokenizer.json and safetensors weights
//! (bf16 / f16 / f32). On the CPU the weights are widened to f32; on a GPU they keep the file's dtype.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{HearthError, Result};
use crate::model::decoder::{
    Activation, Decoder, DecoderConfig, Embeddings, GateUpProj, Layer, Norm, QkvProj, RopeLayout,
};
use crate::model::Model;
use crate::ops::linear::Linear;
use crate::text::ChatTemplate;
use crate::text::Tokenizer;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    /// transformers >= 5 writes the RoPE settings here instead of `rope_theta` / `rope_scaling`.
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    rope_theta: Option<f32>,
    rope_type: Option<String>,
}

impl HfConfig {
    /// RoPE base; checkpoints with scaled RoPE (llama3, yarn, ...) are refused rather than run wrong.
    fn rope_base(&self, dir: &Path) -> Result<f32> {
        for p in [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
        {
            if let Some(t) = p.rope_type.as_deref().filter(|t| *t != "default") {
                return Err(file_err(
                    dir,
                    format!("RoPE scaling `{t}` is not supported"),
                ));
            }
        }
        Ok(self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0))
    }
}

fn dense(w: Tensor) -> Linear {
    Linear::Candle(QMatMul::Tensor(w))
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> HearthError {
    HearthError::ModelFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => HearthError::ModelNotFound(path.display().to_string()),
        _ => file_err(path, e),
    })?;
    serde_json::from_str(&text).map_err(|e| file_err(path, e))
}

/// The weight files a `model.safetensors.index.json` names, each once, in name order.
pub fn shard_files(index: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let idx: Index = read_json(index)?;
    let mut f: Vec<_> = idx.weight_map.into_values().collect();
    f.sort();
    f.dedup();
    Ok(f)
}

fn load_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        shard_files(&index)?
            .into_iter()
            .map(|n| dir.join(n))
            .collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut all = HashMap::new();
    for f in files {
        if !f.exists() {
            return Err(HearthError::ModelNotFound(f.display().to_string()));
        }
        all.extend(candle_core::safetensors::load(&f, device).map_err(|e| file_err(&f, e))?);
    }
    Ok(all)
}

/// Load a checkpoint; on a GPU the Q/K/V and gate/up projections are fused (one matmul each).
pub fn load(dir: &Path, name: &str, device: &Device) -> Result<Model> {
    load_with(dir, name, device, !device.is_cpu())
}

/// `fuse`: concatenate the Q, K, V weights and the gate, up weights, so each group is one matmul (fewer
/// kernel launches per layer on a GPU; on the CPU it only serves to test the fused path).
pub fn load_with(dir: &Path, name: &str, device: &Device, fuse: bool) -> Result<Model> {
    let cfg: HfConfig = read_json(&dir.join("config.json"))?;
    if let Some(a) = cfg.architectures.first() {
        if !matches!(a.as_str(), "LlamaForCausalLM" | "MistralForCausalLM") {
            return Err(HearthError::UnsupportedArchitecture(a.clone()));
        }
    }
    let rope_base = cfg.rope_base(dir)?;
    let mut w = load_weights(dir, device)?;
    let file_dtype = w
        .get("model.embed_tokens.weight")
        .map(|t| t.dtype())
        .unwrap_or(DType::F32);
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        file_dtype
    };
    let mut take = |k: &str| -> Result<Tensor> {
        let t = w
            .remove(k)
            .ok_or_else(|| file_err(dir, format!("tensor `{k}` is missing")))?;
        Ok(t.to_dtype(dtype)?)
    };
    let eps = cfg.rms_norm_eps;
    let n_heads = cfg.num_attention_heads;
    let head_dim = cfg.head_dim.unwrap_or(cfg.hidden_size / n_heads);
    let embed = take("model.embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    let norm = |t: Tensor| Norm {
        weight: t,
        eps: eps as f32,
    };
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let mut w = |n: &str| take(&format!("{p}.{n}.weight"));
        let (wq, wk, wv) = (
            w("self_attn.q_proj")?,
            w("self_attn.k_proj")?,
            w("self_attn.v_proj")?,
        );
        let wo = dense(w("self_attn.o_proj")?);
        let (gate, up) = (w("mlp.gate_proj")?, w("mlp.up_proj")?);
        let down = dense(w("mlp.down_proj")?);
        let (qkv, gate_up) = if fuse {
            (
                QkvProj::Fused(dense(Tensor::cat(&[wq, wk, wv], 0)?)),
                GateUpProj::Fused(dense(Tensor::cat(&[gate, up], 0)?)),
            )
        } else {
            (
                QkvProj::Separate {
                    q: dense(wq),
                    k: dense(wk),
                    v: dense(wv),
                },
                GateUpProj::Separate {
                    gate: dense(gate),
                    up: dense(up),
                },
            )
        };
        layers.push(Layer {
            attn_norm: norm(take(&format!("{p}.input_layernorm.weight"))?),
            qkv,
            wo,
            q_norm: None,
            k_norm: None,
            post_attn_norm: None,
            ffn_norm: norm(take(&format!("{p}.post_attention_layernorm.weight"))?),
            gate_up,
            down,
            post_ffn_norm: None,
        });
    }
    let final_norm = norm(take("model.norm.weight")?);
    let lm_head = dense(if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        take("lm_head.weight")?
    });
    let _ = cfg.intermediate_size;
    let dcfg = DecoderConfig {
        arch: "llama".into(),
        hidden: cfg.hidden_size,
        n_layers: cfg.num_hidden_layers,
        n_heads,
        n_kv_heads: cfg.num_key_value_heads.unwrap_or(n_heads),
        head_dim,
        vocab: cfg.vocab_size,
        max_context: cfg.max_position_embeddings.unwrap_or(4096),
        rms_eps: eps,
        rope_base,
        rope_base_local: rope_base,
        rope_layout: RopeLayout::Halves,
        activation: Activation::Silu,
        embed_scale: None,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        sliding_window: None,
        sliding_pattern: None,
        dtype,
    };
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(HearthError::ModelNotFound(tok_path.display().to_string()));
    }
    let mut tokenizer = Tokenizer::from_file(
        &tok_path,
        None,
        &["</s>", "<|eot_id|>", "<|end_of_text|>", "<|im_end|>"],
    )?;
    tokenizer.bos_id = cfg.bos_token_id;
    match cfg.eos_token_id {
        Some(OneOrMany::One(e)) => tokenizer.eos_ids.push(e),
        Some(OneOrMany::Many(v)) => tokenizer.eos_ids.extend(v),
        None => {}
    }
    let template_src = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| {
            v.get("chat_template")
                .and_then(|t| t.as_str().map(String::from))
        });
    let chat_template = ChatTemplate::new(template_src, "llama", "<s>", "</s>");
    let decoder = Decoder::new(
        dcfg,
        Embeddings::Dense(embed),
        layers,
        final_norm,
        lm_head,
        None,
        device,
    )?;
    Ok(Model {
        name: name.to_string(),
        decoder,
        tokenizer,
        chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> HfConfig {
        serde_json::from_str(&format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "vocab_size": 100{extra}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn rope_base_from_either_config_style_and_scaled_rope_refused() {
        let d = Path::new("m");
        assert_eq!(cfg("").rope_base(d).unwrap(), 10_000.0);
        assert_eq!(cfg(r#", "rope_theta": 5e5"#).rope_base(d).unwrap(), 5e5);
        let v5 = r#", "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}"#;
        assert_eq!(cfg(v5).rope_base(d).unwrap(), 5e5);
        let llama3 = r#", "rope_scaling": {"rope_type": "llama3", "factor": 32.0}"#;
        let e = cfg(llama3).rope_base(d).unwrap_err().to_string();
        assert!(e.contains("llama3"), "{e}");
    }
}
