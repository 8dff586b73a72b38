//! Sentence embeddings: a BERT encoder (candle-transformers' `BertModel`) with sentence-transformers'
//! head (mean of the token states over the attention mask, then L2 normalization), as
//! all-MiniLM-L6-v2 is trained to be used. `batcher` serves it to concurrent requests.
pub mod adapter;
pub mod batcher;
mod cpu_bert;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

use crate::error::{HearthError, Result};

/// sentence-transformers' `max_seq_length` for all-MiniLM-L6-v2 (its `sentence_bert_config.json`),
/// used when the folder does not say; [CLS] and [SEP] included.
const DEFAULT_MAX_TOKENS: usize = 256;

/// An embedding model loaded from a sentence-transformers folder (`config.json`,
/// `model.safetensors`, `tokenizer.json`, optionally `sentence_bert_config.json`).
pub struct Embedder {
    encoder: Encoder,
    /// Cuts at `max_tokens`, as sentence-transformers does.
    tokenizer: Tokenizer,
    /// Cuts nowhere: to tell a too-long input from one that fits.
    whole: Tokenizer,
    max_tokens: usize,
    /// The special tokens the tokenizer puts after a text ([SEP]): kept when ids are cut.
    suffix: Vec<u32>,
    dims: usize,
    vocab: usize,
    /// Weights in each layer's linear projections, and the layer count (the cost model).
    layer_weights: u64,
    layers: u64,
    device: Device,
    /// The merged adapter's digest; empty without one.
    adapter: String,
}

/// Which code computes the encoder.
enum Encoder {
    /// candle-transformers' model: every device.
    Portable(BertModel),
    /// Hearth's CPU encoder (`cpu_bert`): the same model, fewer and larger pieces of work.
    Cpu(cpu_bert::CpuBert),
}

fn file_error(path: &Path, reason: impl ToString) -> HearthError {
    HearthError::ModelFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// The ids the tokenizer appends after a text's own tokens: those after a one-token text's token.
fn special_suffix(tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let encode = |special: bool| {
        tokenizer
            .encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| HearthError::Tokenizer(e.to_string()))
    };
    let (bare, full) = (encode(false)?, encode(true)?);
    Ok(
        match bare.last().and_then(|t| full.iter().rposition(|x| x == t)) {
            Some(at) => full[at + 1..].to_vec(),
            None => Vec::new(),
        },
    )
}

impl Embedder {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_adapted(dir, None, device)
    }

    /// The model with `adapter`'s low-rank updates merged into its weights. On the CPU it runs on
    /// Hearth's encoder unless `HEARTH_PORTABLE_BERT=1` (to compare).
    pub fn load_adapted(
        dir: &Path,
        adapter: Option<&adapter::Adapter>,
        device: &Device,
    ) -> Result<Self> {
        let portable = std::env::var("HEARTH_PORTABLE_BERT").is_ok_and(|v| v == "1");
        Self::load_with(dir, adapter, device, portable)
    }

    /// As `load_adapted`, on candle-transformers' model whatever the device.
    pub fn load_portable(
        dir: &Path,
        adapter: Option<&adapter::Adapter>,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(dir, adapter, device, true)
    }

    fn load_with(
        dir: &Path,
        adapter: Option<&adapter::Adapter>,
        device: &Device,
        portable: bool,
    ) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| file_error(&p, e))
        };
        let cfg_path = dir.join("config.json");
        let cfg: Config = serde_json::from_str(&read("config.json")?)
            .map_err(|e| file_error(&cfg_path, format!("not a BERT config: {e}")))?;
        let max_tokens = match read("sentence_bert_config.json") {
            Ok(s) => serde_json::from_str::<serde_json::Value>(&s)
                .ok()
                .and_then(|v| v["max_seq_length"].as_u64())
                .map_or(DEFAULT_MAX_TOKENS, |n| n as usize),
            Err(_) => DEFAULT_MAX_TOKENS,
        };
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(HearthError::ModelNotFound(weights.display().to_string()));
        }
        let mut tensors = candle_core::safetensors::load(&weights, device)?;
        let adapter = match adapter {
            Some(a) => a.merge(&mut tensors, device)?,
            None => String::new(),
        };
        let cpu = match device.is_cpu() && !portable {
            true => cpu_bert::CpuBert::load(&tensors, &cfg, max_tokens)?,
            false => None,
        };
        let encoder = match cpu {
            Some(e) => Encoder::Cpu(e),
            None => Encoder::Portable(Self::portable(tensors, &cfg, device)?),
        };
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| HearthError::Tokenizer(e.to_string()))?;
        // The file pads every input to 128 tokens and cuts there; sentence-transformers does neither
        // (it cuts at max_seq_length, and padding is the batch's business here).
        tokenizer.with_padding(None);
        let mut whole = tokenizer.clone();
        whole
            .with_truncation(None)
            .map_err(|e| HearthError::Tokenizer(e.to_string()))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| HearthError::Tokenizer(e.to_string()))?;
        let (h, ff) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
        let suffix = special_suffix(&whole)?;
        Ok(Self {
            encoder,
            tokenizer,
            whole,
            max_tokens,
            suffix,
            dims: cfg.hidden_size,
            vocab: cfg.vocab_size,
            // Q, K, V, O, then the feed-forward's two matrices.
            layer_weights: 4 * h * h + 2 * h * ff,
            layers: cfg.num_hidden_layers as u64,
            device: device.clone(),
            adapter,
        })
    }

    /// candle-transformers' model on `tensors`.
    fn portable(
        tensors: std::collections::HashMap<String, Tensor>,
        cfg: &Config,
        device: &Device,
    ) -> Result<BertModel> {
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| {
                // A linear layer multiplies by its weight transposed: kept transposed in memory,
                // that operand is contiguous and the matrix multiply reads it in place instead of
                // repacking the whole weight on every call (most of the time of a short input).
                let linear =
                    t.rank() == 2 && name.ends_with(".weight") && !name.contains("embeddings");
                let t = if linear { t.t()?.contiguous()?.t()? } else { t };
                Ok((name, t.to_dtype(DType::F32)?))
            })
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Ok(BertModel::load(vb, cfg)?)
    }

    /// The code that computes it: Hearth's CPU encoder or candle-transformers' model.
    pub fn encoder(&self) -> &'static str {
        match self.encoder {
            Encoder::Cpu(_) => "hearth-cpu",
            Encoder::Portable(_) => "candle-transformers",
        }
    }

    /// Whether an adapter was merged into its weights.
    pub fn adapted(&self) -> bool {
        !self.adapter.is_empty()
    }

    /// A digest of the adapter merged into its weights; empty without one.
    pub fn adapter_digest(&self) -> &str {
        &self.adapter
    }

    /// Where it computes.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Length of the vectors.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The most tokens one input is embedded from (longer inputs are cut, as sentence-transformers
    /// cuts them).
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Size of the vocabulary: token ids must be below it.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The ids `text` is embedded from: [CLS] text [SEP], cut to `max_tokens`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.tokenizer, text)
    }

    /// [CLS] text [SEP], however long (longer than `max_tokens` cannot be embedded whole).
    pub fn tokenize_whole(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.whole, text)
    }

    /// Token ids (as `tokenize_whole` gives them) cut to `max_tokens` as the tokenizer cuts a
    /// text: the text's tokens are cut, the closing special tokens kept.
    pub fn cut(&self, ids: &[u32]) -> Vec<u32> {
        if ids.len() <= self.max_tokens {
            return ids.to_vec();
        }
        let keep = if ids.ends_with(&self.suffix) && self.max_tokens > self.suffix.len() {
            &self.suffix[..]
        } else {
            &[]
        };
        let mut out = ids[..self.max_tokens - keep.len()].to_vec();
        out.extend_from_slice(keep);
        out
    }

    fn ids(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let enc = tokenizer
            .encode(text, true)
            .map_err(|e| HearthError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Multiply-accumulates to embed one input of `tokens`: every token through each layer's
    /// linear projections, and attention's scores and weighted sum over the input (padding and
    /// the small element-wise work left out, as the decoders' cost model leaves them out).
    pub fn cost(&self, tokens: usize) -> u128 {
        let t = tokens as u128;
        let h = self.dims as u128;
        self.layers as u128 * (t * self.layer_weights as u128 + 2 * t * t * h)
    }

    /// One unit vector per input, from token ids (as `tokenize` gives them), in one padded batch.
    pub fn embed_ids(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        // An empty input has no token to average (its mean would be 0 / 0).
        if inputs.is_empty() || inputs.iter().any(Vec::is_empty) {
            return Err(HearthError::InvalidRequest("nothing to embed".into()));
        }
        let len = inputs.iter().map(Vec::len).max().unwrap_or(0);
        if len > self.max_tokens {
            return Err(HearthError::InvalidRequest(format!(
                "an input has {len} tokens; this model embeds at most {}",
                self.max_tokens
            )));
        }
        if let Some(&id) = inputs
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.vocab)
        {
            return Err(HearthError::InvalidRequest(format!(
                "token id {id} is out of range for this model's {} tokens",
                self.vocab
            )));
        }
        let means = match &self.encoder {
            Encoder::Cpu(e) => e.mean_states(inputs),
            Encoder::Portable(model) => {
                let n = inputs.len();
                let mut ids = vec![0u32; n * len];
                let mut mask = vec![0u32; n * len];
                for (i, input) in inputs.iter().enumerate() {
                    ids[i * len..][..input.len()].copy_from_slice(input);
                    mask[i * len..][..input.len()].fill(1);
                }
                let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
                let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
                let states = model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
                // Mean over the real tokens (padding masked out).
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let sums = states.broadcast_mul(&mask)?.sum(1)?;
                sums.broadcast_div(&mask.sum(1)?)?.to_vec2::<f32>()?
            }
        };
        // Unit length, as sentence-transformers' Normalize: x / max(|x|, 1e-12).
        Ok(means
            .into_iter()
            .map(|m| {
                let norm = m.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                m.iter().map(|v| v / norm).collect()
            })
            .collect())
    }

    /// One unit vector per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>>>()?;
        self.embed_ids(&ids)
    }
}
