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
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{HearthError, Result};

/// The name that selects the built-in adapter in `[[embedding_models]] adapter`.
pub const QUESTIONS: &str = "questions";

/// For all-MiniLM-L6-v2 (sentence-transformers/all-MiniLM-L6-v2) only.
static QUESTIONS_WEIGHTS: &[u8] = include_bytes!("question_adapter.safetensors");

/// The digest `merge` returns for the built-in `questions` adapter.
pub fn questions_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| digest(QUESTIONS_WEIGHTS))
}

fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

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
        if let Some((name, t)) = lora.iter().find(|(_, t)| {
            !matches!(
                t.dtype(),
                DType::F16 | DType::BF16 | DType::F32 | DType::F64
            )
        }) {
            return Err(misfit(format!(
                "`{name}` is {:?}, not floating point",
                t.dtype()
            )));
        }
        let mut values = |name: &str| -> Result<Vec<f32>> {
            let t = lora
                .remove(name)
                .ok_or_else(|| misfit(format!("it has no `{name}`")))?;
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let scale = match values("scale")?.as_slice() {
            &[s] if s.is_finite() => s,
            _ => return Err(misfit("`scale` is not one finite value".into())),
        };
        // The sum of each adapted weight of the model it was trained on, in the order of the
        // names: an adapter of another model of the same shapes is refused, not merged.
        let base_sums = values("base_sums")?;
        let mut stems: Vec<String> = lora
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_a").map(str::to_string))
            .collect();
        stems.sort();
        if stems.is_empty() || 2 * stems.len() != lora.len() || base_sums.len() != stems.len() {
            return Err(misfit(
                "expected pairs of `.lora_a` and `.lora_b` tensors, and a base sum for each".into(),
            ));
        }
        for (stem, want) in stems.iter().zip(base_sums) {
            let (a, b) = match (
                lora.get(&format!("{stem}.lora_a")),
                lora.get(&format!("{stem}.lora_b")),
            ) {
                (Some(a), Some(b)) => (a, b),
                _ => return Err(misfit(format!("`{stem}.lora_b` is missing"))),
            };
            let w_name = format!("{stem}.weight");
            let w = weights
                .get(&w_name)
                .ok_or_else(|| misfit(format!("the model has no `{w_name}`")))?
                .to_dtype(DType::F32)?;
            let (out, inp) = w.dims2()?;
            let (ra, ia) = a.dims2()?;
            let (ob, rb) = b.dims2()?;
            if (ob, ia, rb) != (out, inp, ra) {
                return Err(misfit(format!(
                    "`{stem}`: {out}x{inp} in the model, {ob}x{rb} @ {ra}x{ia} in the adapter"
                )));
            }
            // In f64: an f32 sum of half a million values drifts by more than the tolerance.
            let have = w.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            let want = f64::from(want);
            if (have - want).abs() > 1e-5 * (1.0 + want.abs()) {
                return Err(misfit(format!(
                    "it was trained on other weights (`{w_name}` sums to {have}, not {want})"
                )));
            }
            let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale as f64)?;
            if !delta.abs()?.sum_all()?.to_scalar::<f32>()?.is_finite() {
                return Err(misfit(format!("`{stem}` has values that are not finite")));
            }
            weights.insert(w_name, (w + delta)?);
        }
        Ok(digest(&bytes))
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

    /// The model's weights as the built-in adapter names them, each `rows x cols` and `fill`.
    fn weights_like_the_adapter(
        shape: Option<(usize, usize)>,
        fill: f32,
    ) -> HashMap<String, Tensor> {
        let lora = Adapter::tensors(QUESTIONS_WEIGHTS, &Device::Cpu).expect("built in");
        lora.iter()
            .filter_map(|(k, a)| {
                let stem = k.strip_suffix(".lora_a")?;
                let b = &lora[&format!("{stem}.lora_b")];
                let (out, inp) = shape.unwrap_or((b.dims()[0], a.dims()[1]));
                let w = Tensor::full(fill, (out, inp), &Device::Cpu).expect("full");
                Some((format!("{stem}.weight"), w))
            })
            .collect()
    }

    fn refusal(weights: &mut HashMap<String, Tensor>, adapter: &Adapter) -> String {
        adapter
            .merge(weights, &Device::Cpu)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn an_adapter_of_other_shapes_or_other_weights_is_refused() {
        let err = refusal(
            &mut weights_like_the_adapter(Some((8, 8)), 0.0),
            &Adapter::Questions,
        );
        assert!(
            err.contains("does not fit") && err.contains("8x8 in the model"),
            "{err}"
        );
        // The right shapes, but not all-MiniLM-L6-v2's weights.
        let err = refusal(
            &mut weights_like_the_adapter(None, 0.0),
            &Adapter::Questions,
        );
        assert!(err.contains("trained on other weights"), "{err}");
    }

    #[test]
    fn an_adapter_with_values_that_are_not_finite_is_refused() {
        let d = Device::Cpu;
        let mut weights = HashMap::new();
        weights.insert(
            "l.weight".to_string(),
            Tensor::ones((4, 3), DType::F32, &d).unwrap(),
        );
        let write = |scale: f32, a_fill: f32| {
            let t: HashMap<String, Tensor> = [
                ("l.lora_a", Tensor::full(a_fill, (2, 3), &d).unwrap()),
                ("l.lora_b", Tensor::ones((4, 2), DType::F32, &d).unwrap()),
                ("scale", Tensor::new(&[scale], &d).unwrap()),
                ("base_sums", Tensor::new(&[12f32], &d).unwrap()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let p = std::env::temp_dir().join(format!(
                "hearth-adapter-{}-{scale}-{a_fill}.safetensors",
                std::process::id()
            ));
            candle_core::safetensors::save(&t, &p).unwrap();
            Adapter::File(p)
        };
        let files = [
            write(0.5, 1.0),
            write(f32::NAN, 1.0),
            write(0.5, f32::INFINITY),
        ];
        files[0]
            .merge(&mut weights.clone(), &d)
            .expect("a finite adapter merges");
        for bad in &files[1..] {
            let err = refusal(&mut weights.clone(), bad);
            assert!(err.contains("finite"), "{err}");
        }
        for a in files {
            if let Adapter::File(p) = a {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
