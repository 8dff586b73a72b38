//! Low-rank adapters (LoRA) merged into an embedding model's weights when it loads: `W += scale *
//! B @ A` for each adapted projection, so the adapted model costs what the base costs.
//!
//! The built-in `questions` adapter tunes all-MiniLM-L6-v2 for the semantic response cache: the
//! base model rates a question and another on the same topic ("how long is the warranty" / "what
//! does the warranty cover") as more alike than a question and the same question heavily reworded.
//! `scripts/train_cache_adapter.py` trained it on the project's labelled question pairs
//! (benches/cache_pairs*.jsonl); benches/RESULTS.md has what it changes on pairs it never saw.
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{HearthError, Result};

/// The name that selects the built-in adapter in `[[embedding_models]] adapter`.
pub const QUESTIONS: &str = "questions";

/// For all-MiniLM-L6-v2 (sentence-transformers/all-MiniLM-L6-v2) only.
static QUESTIONS_WEIGHTS: &[u8] = include_bytes!("question_adapter.safetensors");

/// Where an adapter's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Adapter {
    /// Built into Hearth, by name.
    Questions,
    /// A safetensors file: `<weight name minus .weight>.lora_a` (rank x in) and `.lora_b`
    /// (out x rank) per adapted projection, and `scale` (one value: alpha / rank).
    File(PathBuf),
}

impl Adapter {
    /// `questions`, or a file's path.
    pub fn parse(s: &str) -> Self {
        if s == QUESTIONS {
            Self::Questions
        } else {
            Self::File(s.into())
        }
    }

    fn bytes(&self) -> Result<Cow<'static, [u8]>> {
        Ok(match self {
            Self::Questions => Cow::Borrowed(QUESTIONS_WEIGHTS),
            Self::File(p) => Cow::Owned(
                std::fs::read(p)
                    .map_err(|e| HearthError::ModelNotFound(format!("{}: {e}", p.display())))?,
            ),
        })
    }

    fn tensors(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>> {
        Ok(candle_core::safetensors::load_buffer(bytes, device)?)
    }

    fn describe(&self) -> String {
        match self {
            Self::Questions => format!("the built-in `{QUESTIONS}` adapter"),
            Self::File(p) => format!("adapter {}", p.display()),
        }
    }

    /// Adds the adapter's low-rank updates to `weights` (the base model's tensors by name), and
    /// says which adapter it was: a digest of its bytes (the response cache keeps the vectors of
    /// other weights apart).
    pub fn merge(&self, weights: &mut HashMap<String, Tensor>, device: &Device) -> Result<String> {
        let misfit = |why: String| {
            HearthError::Config(format!(
                "{} does not fit this model: {why}",
                self.describe()
            ))
        };
        let bytes = self.bytes()?;
        let mut lora = Self::tensors(&bytes, device)?;
        let scale = lora
            .remove("scale")
            .ok_or_else(|| misfit("it has no `scale`".into()))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let &[scale] = scale.as_slice() else {
            return Err(misfit("`scale` is not one value".into()));
        };
        let mut names: Vec<&String> = lora.keys().filter(|k| k.ends_with(".lora_a")).collect();
        names.sort();
        if names.is_empty() || 2 * names.len() != lora.len() {
            return Err(misfit(
                "expected pairs of `.lora_a` and `.lora_b` tensors".into(),
            ));
        }
        for a_name in names {
            let stem = a_name.trim_end_matches(".lora_a");
            let b = lora
                .get(&format!("{stem}.lora_b"))
                .ok_or_else(|| misfit(format!("`{stem}.lora_b` is missing")))?;
            let w_name = format!("{stem}.weight");
            let w = weights
                .get(&w_name)
                .ok_or_else(|| misfit(format!("the model has no `{w_name}`")))?;
            let a = &lora[a_name];
            let (out, inp) = w.dims2()?;
            let (ra, ia) = a.dims2()?;
            let (ob, rb) = b.dims2()?;
            if (ob, ia, rb) != (out, inp, ra) {
                return Err(misfit(format!(
                    "`{stem}`: {out}x{inp} in the model, {ob}x{rb} @ {ra}x{ia} in the adapter"
                )));
            }
            let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale as f64)?;
            let merged = (w.to_dtype(DType::F32)? + delta)?;
            weights.insert(w_name, merged);
        }
        let digest = Sha256::digest(&bytes);
        Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_adapter_reads_and_names_parse() {
        let t = Adapter::tensors(QUESTIONS_WEIGHTS, &Device::Cpu).expect("built in");
        assert!(t.contains_key("scale"));
        assert!(t.keys().any(|k| k.ends_with(".lora_a")));
        assert_eq!(Adapter::parse("questions"), Adapter::Questions);
        assert_eq!(
            Adapter::parse("x/a.safetensors"),
            Adapter::File("x/a.safetensors".into())
        );
    }

    #[test]
    fn an_adapter_of_other_shapes_is_refused_by_name() {
        let mut weights = HashMap::new();
        weights.insert(
            "encoder.layer.2.attention.self.query.weight".to_string(),
            Tensor::zeros((8, 8), DType::F32, &Device::Cpu).expect("zeros"),
        );
        let err = Adapter::Questions
            .merge(&mut weights, &Device::Cpu)
            .expect_err("shapes differ");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
