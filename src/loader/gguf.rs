//! GGUF loading: llama-family (llama, mistral, qwen2) and gemma3 files into a `Decoder`, with the
//! tokenizer and chat template from the file's metadata.
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device};

use crate::error::{HearthError, Result};
use crate::model::decoder::{
    Activation, Decoder, DecoderConfig, Embeddings, GateUpProj, Layer, Norm, QkvProj, RopeLayout,
};
use crate::model::Model;
use crate::ops::linear::Linear;
use crate::text::ChatTemplate;
use crate::text::Tokenizer;

struct Reader<'a, R> {
    ct: &'a Content,
    r: &'a mut R,
    device: &'a Device,
    path: &'a str,
    progress: indicatif::ProgressBar,
}

impl<R: Read + Seek> Reader<'_, R> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.progress.inc(1);
        if !self.ct.tensor_infos.contains_key(name) {
            return Err(HearthError::ModelFile {
                path: self.path.to_string(),
                reason: format!("tensor `{name}` is missing"),
            });
        }
        self.ct
            .tensor(self.r, name, self.device)
            .map_err(|e| HearthError::ModelFile {
                path: self.path.to_string(),
                reason: format!("cannot read tensor `{name}`: {e} (truncated file?)"),
            })
    }

    fn linear(&mut self, name: &str) -> Result<Linear> {
        Linear::from_qtensor(self.qtensor(name)?)
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<Norm> {
        let weight = self.qtensor(name)?.dequantize(self.device)?;
        Ok(Norm {
            weight,
            eps: eps as f32,
        })
    }

    fn opt_norm(&mut self, name: &str, eps: f64) -> Result<Option<Norm>> {
        if self.ct.tensor_infos.contains_key(name) {
            Ok(Some(self.norm(name, eps)?))
        } else {
            Ok(None)
        }
    }
}

fn md_u32(ct: &Content, key: &str) -> Result<usize> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .ok_or_else(|| HearthError::MissingMetadata(key.to_string()))
}

fn md_f32(ct: &Content, key: &str) -> Option<f32> {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok())
}

pub fn open(path: &Path) -> Result<(Content, BufReader<File>)> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => HearthError::ModelNotFound(shown.clone()),
        _ => HearthError::ModelFile {
            path: shown.clone(),
            reason: e.to_string(),
        },
    })?;
    let len = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let ct = Content::read(&mut r).map_err(|e| HearthError::ModelFile {
        path: shown.clone(),
        reason: format!("not a readable GGUF file: {e}"),
    })?;
    // A truncated download parses its header fine but lacks tensor data; catch it before loading.
    let needed = ct
        .tensor_infos
        .values()
        .map(|t| {
            let bytes = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
            ct.tensor_data_offset + t.offset + bytes as u64
        })
        .max()
        .unwrap_or(0);
    if needed > len {
        return Err(HearthError::ModelFile {
            path: shown,
            reason: format!("file is truncated: {len} bytes, tensors need {needed}"),
        });
    }
    Ok((ct, r))
}

pub fn load(path: &Path, name: &str, device: &Device) -> Result<Model> {
    let (ct, mut file) = open(path)?;
    let shown = path.display().to_string();
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .ok_or_else(|| HearthError::MissingMetadata("general.architecture".into()))?;
    let gemma = match arch.as_str() {
        "llama" | "mistral" | "qwen2" => false,
        "gemma3" => true,
        other => return Err(HearthError::UnsupportedArchitecture(other.to_string())),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = md_u32(&ct, &key("embedding_length"))?;
    let n_heads = md_u32(&ct, &key("attention.head_count"))?;
    let n_kv_heads = md_u32(&ct, &key("attention.head_count_kv")).unwrap_or(n_heads);
    let head_dim = md_u32(&ct, &key("attention.key_length")).unwrap_or(hidden / n_heads);
    let n_layers = md_u32(&ct, &key("block_count"))?;
    let max_context = md_u32(&ct, &key("context_length")).unwrap_or(4096);
    let rms_eps = md_f32(&ct, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5) as f64;
    let rope_dim = md_u32(&ct, &key("rope.dimension_count")).unwrap_or(head_dim);
    if rope_dim != head_dim {
        return Err(HearthError::ModelFile {
            path: shown,
            reason: format!(
                "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
            ),
        });
    }
    let tokenizer = Tokenizer::from_gguf(&ct)?;
    let vocab = md_u32(&ct, &key("vocab_size")).unwrap_or_else(|_| tokenizer.vocab_size());

    let (sliding_window, sliding_pattern, rope_base_local) = if gemma {
        (
            md_u32(&ct, &key("attention.sliding_window")).ok(),
            Some(md_u32(&ct, &key("attention.sliding_window_type")).unwrap_or(6)),
            md_f32(&ct, &key("rope.local_freq_base")).unwrap_or(10_000.0),
        )
    } else {
        (None, None, 0.0)
    };
    let rope_base = md_f32(&ct, &key("rope.freq_base")).unwrap_or(if gemma { 1e6 } else { 1e4 });
    let cfg = DecoderConfig {
        arch: arch.clone(),
        hidden,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab,
        max_context,
        rms_eps,
        rope_base,
        rope_base_local: if gemma { rope_base_local } else { rope_base },
        // llama.cpp's converter permutes Llama/Mistral Q and K rows for the interleaved layout.
        rope_layout: if arch == "llama" || arch == "mistral" {
            RopeLayout::Interleaved
        } else {
            RopeLayout::Halves
        },
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        embed_scale: gemma.then(|| (hidden as f32).sqrt()),
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        sliding_window,
        sliding_pattern,
        dtype: DType::F32,
    };

    let mut rd = Reader {
        ct: &ct,
        r: &mut file,
        device,
        path: &shown,
        progress: super::progress(ct.tensor_infos.len(), name),
    };
    let embed_q = Arc::new(rd.qtensor("token_embd.weight")?);
    let (embed, lm_head) = if rd.ct.tensor_infos.contains_key("output.weight") {
        (Embeddings::Quantized(embed_q), rd.linear("output.weight")?)
    } else {
        // Tied: where the output projection goes into panels, the lookup reads them (the file's
        // layout is dropped, not kept beside them).
        match Linear::from_arc(embed_q.clone())? {
            Linear::Panels(p) => {
                drop(embed_q);
                (Embeddings::Panels(p.clone()), Linear::Panels(p))
            }
            other => (Embeddings::Quantized(embed_q), other),
        }
    };
    let final_norm = rd.norm("output_norm.weight", rms_eps)?;
    let rope_freqs = if rd.ct.tensor_infos.contains_key("rope_freqs.weight") {
        Some(
            rd.qtensor("rope_freqs.weight")?
                .dequantize(device)?
                .to_vec1::<f32>()?,
        )
    } else {
        None
    };
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let p = format!("blk.{i}");
        layers.push(Layer {
            attn_norm: rd.norm(&format!("{p}.attn_norm.weight"), rms_eps)?,
            qkv: QkvProj::Separate {
                q: rd.linear(&format!("{p}.attn_q.weight"))?,
                k: rd.linear(&format!("{p}.attn_k.weight"))?,
                v: rd.linear(&format!("{p}.attn_v.weight"))?,
            },
            wo: rd.linear(&format!("{p}.attn_output.weight"))?,
            q_norm: rd.opt_norm(&format!("{p}.attn_q_norm.weight"), rms_eps)?,
            k_norm: rd.opt_norm(&format!("{p}.attn_k_norm.weight"), rms_eps)?,
            post_attn_norm: rd.opt_norm(&format!("{p}.post_attention_norm.weight"), rms_eps)?,
            ffn_norm: rd.norm(&format!("{p}.ffn_norm.weight"), rms_eps)?,
            gate_up: GateUpProj::Separate {
                gate: rd.linear(&format!("{p}.ffn_gate.weight"))?,
                up: rd.linear(&format!("{p}.ffn_up.weight"))?,
            },
            down: rd.linear(&format!("{p}.ffn_down.weight"))?,
            post_ffn_norm: rd.opt_norm(&format!("{p}.post_ffw_norm.weight"), rms_eps)?,
        });
    }
    let chat_template = ct
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let tok_str = |id: Option<u32>| -> String {
        id.and_then(|i| {
            ct.metadata
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .and_then(|v| v.get(i as usize))
                .and_then(|v| v.to_string().ok().cloned())
        })
        .unwrap_or_default()
    };
    let template = ChatTemplate::new(
        chat_template,
        &arch,
        &tok_str(tokenizer.bos_id),
        &tok_str(tokenizer.eos_ids.first().copied()),
    );
    let decoder = Decoder::new(cfg, embed, layers, final_norm, lm_head, rope_freqs, device)?;
    rd.progress.finish_and_clear();
    Ok(Model {
        name: name.to_string(),
        decoder,
        tokenizer,
        chat_template: template,
    })
}
