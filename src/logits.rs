//! `hearth logits`: next-token logits of a batch of prompts, computed the way the engine computes them
//! (one ragged batch, paged KV cache) in three steps per prompt: a first prefill chunk, a second chunk
//! that attends to the cached first one, and a one-token decode. Used to compare Hearth against an
//! independent implementation (scripts/gpu_check.py compares it with Hugging Face transformers).
use candle_core::{Device, Tensor};

use crate::error::{HearthError, Result};
use crate::model::{AttentionBackend, Batch, Model};
use crate::ops::greedy;

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
    let s = staged_logits_with(model, prompts, backend, block_size, false)?;
    Ok((s.infos, s.rows))
}

/// `staged_logits_with`'s rows, and how far a decode graph's replay moved them.
pub struct Staged {
    pub infos: Vec<RowInfo>,
    pub rows: Vec<Vec<f32>>,
    /// The decode rows' largest difference between the graph's replay and the run before its
    /// capture; None where no graph ran.
    pub graph_replay_vs_first_max: Option<f32>,
    /// The largest difference between graph and eager logits over `GRAPH_STEPS` further greedy
    /// steps; None where no graph ran.
    pub graph_steps_vs_eager_max: Option<f32>,
}

/// `staged_logits`, with the decode stage optionally through a CUDA decode graph (where the build,
/// device and backend have them): the stage runs twice, capturing and then replaying, and the
/// replay's rows are returned with their largest difference from the first run's.
pub fn staged_logits_with(
    model: &Model,
    prompts: &[Vec<u32>],
    backend: AttentionBackend,
    block_size: usize,
    graphs: bool,
) -> Result<Staged> {
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
    // Each prompt gets its own contiguous run of blocks, with room for the graph steps after it.
    let mut tables = Vec::with_capacity(prompts.len());
    let mut next = 0u32;
    for p in prompts {
        let n = (p.len() + GRAPH_STEPS).div_ceil(block_size) as u32;
        tables.push((next..next + n).collect::<Vec<u32>>());
        next += n;
    }
    #[cfg(feature = "cuda")]
    let graphs = if graphs {
        crate::engine::decode_graphs::DecodeGraphs::new(
            &model.decoder.device,
            backend,
            model.decoder.cfg.vocab,
            model.decoder.cfg.max_context.div_ceil(block_size),
        )?
        .map(|g| g.with_sink(next))
    } else {
        None
    };
    #[cfg(not(feature = "cuda"))]
    let _ = graphs;
    // One block more than the prompts use: a graph's pad rows write there.
    let kv = model.decoder.new_kv_cache(next as usize + 1, block_size)?;
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut replay_diff = None;
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
        #[cfg(feature = "cuda")]
        if let (Some(g), "decode") = (&graphs, name) {
            // The first run's rows are read before the replay overwrites the shared buffer.
            let first = g.run(&model.decoder, &kv, &batch)?;
            let first = first.map(|o| o.logits.to_vec2::<f32>()).transpose()?;
            let again = g.run(&model.decoder, &kv, &batch)?;
            if let (Some(a), Some(b)) = (first, again) {
                let b = b.logits.to_vec2::<f32>()?;
                replay_diff = Some(max_abs_diff(&a, &b));
                rows.extend(b);
                continue;
            }
        }
        let logits = model.decoder.forward(&batch, &kv, backend)?;
        rows.extend(logits.to_vec2::<f32>()?);
    }
    #[cfg(feature = "cuda")]
    let steps_diff = match &graphs {
        Some(g) => {
            let decoded = &rows[2 * prompts.len()..];
            let next = decoded.iter().map(|r| greedy::pick(r).token).collect();
            let starts = prompts.iter().map(Vec::len).collect();
            graph_steps(g, model, &kv, backend, &tables, starts, next)?
        }
        None => None,
    };
    #[cfg(not(feature = "cuda"))]
    let steps_diff = None;
    Ok(Staged {
        infos,
        rows,
        graph_replay_vs_first_max: replay_diff,
        graph_steps_vs_eager_max: steps_diff,
    })
}

/// Greedy decode steps `staged_logits_with` takes past its prompts through a decode graph.
pub const GRAPH_STEPS: usize = 8;

/// `GRAPH_STEPS` greedy steps past each prompt (starting at position `starts[i]` with token
/// `next[i]`), each through the decode graph and then the eager forward of the same batch (which
/// rewrites the same K/V): the graph replayed over inputs that change every step, and captured
/// again once the tables cross into a wider bucket. The largest logit difference, or None if the
/// graph did not run.
#[cfg(feature = "cuda")]
fn graph_steps(
    g: &crate::engine::decode_graphs::DecodeGraphs,
    model: &Model,
    kv: &crate::model::KvCache,
    backend: AttentionBackend,
    tables: &[Vec<u32>],
    starts: Vec<usize>,
    mut next: Vec<u32>,
) -> Result<Option<f32>> {
    let mut worst = 0f32;
    for k in 0..GRAPH_STEPS {
        let mut batch = Batch::new(kv.block_size);
        for ((t, start), table) in next.iter().zip(&starts).zip(tables) {
            batch.push(&[*t], start + k, table, true);
        }
        let Some(out) = g.run(&model.decoder, kv, &batch)? else {
            return Ok(None);
        };
        let got = out.logits.to_vec2::<f32>()?;
        let want = model
            .decoder
            .forward(&batch, kv, backend)?
            .to_vec2::<f32>()?;
        worst = worst.max(max_abs_diff(&got, &want));
        next = want.iter().map(|r| greedy::pick(r).token).collect();
    }
    Ok(Some(worst))
}

/// The largest absolute difference between two sets of rows.
#[cfg(feature = "cuda")]
fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The device's greedy picks of logit rows against the host pass (`ops::greedy::pick`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PickCheck {
    pub rows: usize,
    pub token_mismatches: usize,
    pub lse_max_diff: f32,
    pub entropy_max_diff: f32,
    /// Over rows without an exact tie for the top.
    pub margin_max_diff: f32,
}

/// Uploads `rows` to `device`, picks there as the engine does (`runner::device_picks`), and
/// compares each pick with the host pass over the same row.
pub fn pick_check(rows: &[Vec<f32>], device: &Device) -> Result<PickCheck> {
    let vocab = rows.first().map_or(0, Vec::len);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (rows.len(), vocab), device)?;
    let got = crate::engine::runner::device_picks(&t)?;
    let mut c = PickCheck {
        rows: rows.len(),
        token_mismatches: 0,
        lse_max_diff: 0.0,
        entropy_max_diff: 0.0,
        margin_max_diff: 0.0,
    };
    for (g, row) in got.iter().zip(rows) {
        let want = greedy::pick(row);
        c.token_mismatches += usize::from(g.token != want.token);
        c.lse_max_diff = c.lse_max_diff.max((g.lse - want.lse).abs());
        c.entropy_max_diff = c.entropy_max_diff.max((g.entropy - want.entropy).abs());
        // On an exact tie for the top the host pass's margin is 0; candle's reductions (the
        // fallback off CUDA) give the gap to the next distinct value instead.
        if want.margin > 0.0 {
            c.margin_max_diff = c.margin_max_diff.max((g.margin - want.margin).abs());
        }
    }
    Ok(c)
}
