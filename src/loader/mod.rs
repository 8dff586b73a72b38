//! Model files to a `Model`: GGUF, safetensors checkpoints, and either from the Hugging Face Hub.
pub mod gguf;
pub mod hub;
pub mod safetensors;

use std::path::Path;

use candle_core::Device;

use crate::error::{HearthError, Result};
use crate::model::Model;

/// A progress bar over `len` steps of loading `what`, drawn only when stderr is a terminal.
pub fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("loading {what}"));
    bar
}

/// Load a GGUF file, a folder holding a safetensors checkpoint, or either from the Hugging Face Hub
/// (`hf:ORG/REPO[@REVISION][:FILE]`, see `hub`).
pub fn load(path: &Path, name: &str, device: &Device) -> Result<Model> {
    if let Some(spec) = path.to_str().and_then(hub::parse) {
        let local = hub::resolve(&spec?, hf_hub::Cache::from_env(), hub::offline_from_env())?;
        return load(&local, name, device);
    }
    if path.is_dir() {
        return safetensors::load(path, name, device);
    }
    if !path.exists() {
        return Err(HearthError::ModelNotFound(path.display().to_string()));
    }
    gguf::load(path, name, device)
}
