//! `hearth logits`: next-token logits of a batch of prompts, computed the way the engine computes them
//! (one ragged batch, paged KV cache) in three steps per prompt: a first prefill chunk, a second chunk
//! that attends to the cached first one, and a one-token decode. Used to compare Hearth against an
//! independent implementation (scripts/gpu_check.py compares it with Hugging Face transformers).
use crate::error::{HearthError, Result};
use crate::model::{AttentionBackend, Batch, Model};

/// One logits row: which prompt, and the position whose next token it predicts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowInfo {
    pub prompt: usize,
    pub pos: usize,
    /// `prefill`, `cached-prefill` or `decode`.
    pub step: &'static str,
}

/// Positions at which each stage ends for a prompt of `len` tokens: [len/2 - 1, len - 2, len - 1].
pub fn stage_ends(len: usize) -> [usize; 3] {
    [len / 2 - 1, len - 2, len - 1]
}

/// Logits (f32 rows) for every prompt at `stage_ends`, in (stage, prompt) order.
pub fn staged_logits(
    model: &Model,
    prompts: &[Vec<u32>],
    backend: AttentionBackend,
    block_size: usize,
) -> Result<(Vec<RowInfo>, Vec<Vec<f32>>)> {
    if let Some(p) = prompts.iter().find(|p| p.len() < 4) {
        return Err(HearthError::InvalidRequest(format!(
            "prompts need at least 4 tokens (got {})",
            p.len()
        )));
    }
    let vocab = model.decoder.cfg.vocab as u32;
    if let Some(&t) = prompts.iter().flatten().find(|&&t| t >= vocab) {
        return Err(HearthError::InvalidRequest(format!(
            "token id {t} is outside the vocabulary ({vocab})"
        )));
    }
    // Each prompt gets its own contiguous run of blocks.
    let mut tables = Vec::with_capacity(prompts.len());
    let mut next = 0u32;
    for p in prompts {
        let n = p.len().div_ceil(block_size) as u32;
        tables.push((next..next + n).collect::<Vec<u32>>());
        next += n;
    }
    let kv = model.decoder.new_kv_cache(next as usize, block_size)?;
    let mut infos = Vec::new();
    let mut rows = Vec::new();
    let mut start = vec![0usize; prompts.len()];
    for (stage, name) in ["prefill", "cached-prefill", "decode"]
        .into_iter()
        .enumerate()
    {
        let mut batch = Batch::new(block_size);
        for (i, p) in prompts.iter().enumerate() {
            let end = stage_ends(p.len())[stage] + 1;
            batch.push(&p[start[i]..end], start[i], &tables[i], true);
            infos.push(RowInfo {
                prompt: i,
                pos: end - 1,
                step: name,
            });
            start[i] = end;
        }
        let logits = model.decoder.forward(&batch, &kv, backend)?;
        rows.extend(logits.to_vec2::<f32>()?);
    }
    Ok((infos, rows))
}
