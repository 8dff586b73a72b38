//! Runs a step plan: one forward over the ragged batch, logits back as host vectors. No policy here.
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor, D};

use crate::device::StepTimer;
use crate::engine::sampler::Spread;
use crate::error::{HearthError, Result};
use crate::model::{AttentionBackend, Batch, Decoder, KvCache};
use crate::ops::greedy;

use super::scheduler::StepPlan;

/// What the sampler gets for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// The whole logit row.
    Full(Vec<f32>),
    /// The argmax, its log-probability and its distribution's spread, computed on the device.
    Greedy {
        token: u32,
        logprob: f32,
        spread: Spread,
    },
}

pub struct StepOutput {
    /// One row per plan item that wants logits, in plan order.
    pub rows: Vec<Row>,
    /// Host wall time of the step.
    pub elapsed: Duration,
    /// Time the device spent on the step (CUDA events on a GPU; wall time on the CPU).
    pub device_time: Duration,
    /// The step's logits (one row per `rows` entry), for a sampler that finds the device's argmax
    /// refused by its grammar and needs the whole row after all.
    pub logits: Option<Tensor>,
}

pub struct Runner {
    pub decoder: Decoder,
    pub kv: KvCache,
    pub backend: AttentionBackend,
    /// Decode steps as CUDA graphs (None: every step runs eagerly).
    #[cfg(feature = "cuda")]
    pub graphs: Option<super::decode_graphs::DecodeGraphs>,
}

impl Runner {
    pub fn batch(&self, plan: &StepPlan) -> Batch {
        let mut b = Batch::new(self.kv.block_size);
        for it in &plan.items {
            b.push(&it.tokens, it.first_pos, &it.block_table, it.wants_logits);
        }
        b
    }

    /// Run the plan: one forward, then a logits row (whole, or argmax on the device) for every item
    /// that wants one, as the item says.
    pub fn execute(&self, plan: &StepPlan) -> Result<StepOutput> {
        let t0 = Instant::now();
        let batch = self.batch(plan);
        let full: Vec<bool> = plan
            .items
            .iter()
            .filter(|it| it.wants_logits)
            .map(|it| it.full_logits)
            .collect();
        let turn = crate::device::cpu_turn(&self.decoder.device);
        let timer = StepTimer::start(&self.decoder.device);
        for c in &plan.copies {
            self.kv.copy_slots(c)?;
        }
        let (logits, picks) = self.forward(&batch)?;
        let device_time = timer.stop();
        let rows = read_rows(&logits, &full, picks.as_ref())?;
        drop(turn);
        Ok(StepOutput {
            rows,
            elapsed: t0.elapsed(),
            device_time,
            logits: Some(logits),
        })
    }

    /// The step's forward: through a decode graph where one applies, eagerly otherwise. Also
    /// returns `pick_tensors` of the logits where the graph computed them.
    fn forward(&self, batch: &Batch) -> Result<(Tensor, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.graphs {
            if let Some(out) = g.run(&self.decoder, &self.kv, batch)? {
                return Ok((out.logits, Some(out.picks)));
            }
        }
        Ok((self.decoder.forward(batch, &self.kv, self.backend)?, None))
    }
}

/// Logits (rows, vocab) to sampler rows: whole rows where wanted, argmax and log-normalizer otherwise
/// (from `picks`, `pick_tensors` of the logits, where the device already computed them).
fn read_rows(logits: &Tensor, full: &[bool], picks: Option<&Tensor>) -> Result<Vec<Row>> {
    let n = logits.dim(0)?;
    if full.len() != n {
        return Err(HearthError::Internal(format!(
            "{} sampling flags for {n} logit rows",
            full.len()
        )));
    }
    if full.iter().all(|&f| f) {
        return Ok(logits
            .to_vec2::<f32>()?
            .into_iter()
            .map(Row::Full)
            .collect());
    }
    if logits.device().is_cpu() {
        return cpu_rows(logits, full);
    }
    let picks = match picks {
        Some(picks) => read_picks(picks)?,
        None => device_picks(logits)?,
    };
    let wanted: Vec<u32> = (0..n as u32).filter(|&i| full[i as usize]).collect();
    let mut whole = if wanted.is_empty() {
        Vec::new()
    } else {
        let idx = Tensor::new(wanted.as_slice(), logits.device())?;
        logits.index_select(&idx, 0)?.to_vec2::<f32>()?
    }
    .into_iter();
    let mut rows = Vec::with_capacity(n);
    for (i, &f) in full.iter().enumerate() {
        rows.push(match (f, if f { whole.next() } else { None }) {
            (true, Some(r)) => Row::Full(r),
            _ => picks[i].into(),
        });
    }
    Ok(rows)
}

impl From<greedy::Pick> for Row {
    fn from(p: greedy::Pick) -> Self {
        Row::Greedy {
            token: p.token,
            // The argmax's logit is the maximum, so its log-probability is -log(sum exp(l - max)).
            logprob: -p.lse,
            spread: Spread {
                entropy: p.entropy,
                margin: p.margin,
            },
        }
    }
}

/// `greedy::pick` of every row, computed where the logits are (a few reductions per row: the
/// host reads back four numbers per sequence, not a vocabulary-sized row).
pub(crate) fn device_picks(logits: &Tensor) -> Result<Vec<greedy::Pick>> {
    read_picks(&pick_tensors(logits)?)
}

/// The device half of `device_picks`: per row (token, log-normalizer, entropy before clamping at 0,
/// runner-up - max) as (rows, 4) f32 (token ids below 2^24 are exact). Device work only, so a CUDA
/// graph can hold it; on CUDA one kernel.
pub(crate) fn pick_tensors(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return Ok(logits
            .contiguous()?
            .apply_op1_no_bwd(&crate::ops::cuda_greedy::GreedyPick)?);
    }
    let tokens = logits.argmax_keepdim(D::Minus1)?.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let e = shifted.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let lse = sum.log()?;
    // H = ln(sum) - sum(e * (l - max)) / sum, with l - max clamped as the CPU pass clamps it (a
    // masked -inf logit adds nothing rather than 0 x inf).
    let moment = (e * shifted.maximum(-crate::ops::vexp::CLAMP)?)?.sum_keepdim(D::Minus1)?;
    let entropy = lse.sub(&moment.div(&sum)?)?;
    // The runner-up: the row's maximum with its maxima pushed far down (a tie gives a margin of
    // the next distinct value, where the CPU pass gives 0).
    let at_max = shifted.eq(0f32)?.to_dtype(DType::F32)?;
    let second = (shifted - (at_max * 1e30)?)?.max_keepdim(D::Minus1)?;
    Ok(Tensor::cat(&[&tokens, &lse, &entropy, &second], 1)?)
}

/// The host half of `device_picks`: one read-back of four numbers per row.
fn read_picks(picks: &Tensor) -> Result<Vec<greedy::Pick>> {
    Ok(picks
        .to_vec2::<f32>()?
        .into_iter()
        .map(|r| greedy::Pick {
            token: r[0] as u32,
            lse: r[1],
            entropy: r[2].max(0.0),
            margin: -r[3],
        })
        .collect())
}

/// `read_rows` on the CPU: one pass per greedy row (`ops::greedy`), rows on the pool.
fn cpu_rows(logits: &Tensor, full: &[bool]) -> Result<Vec<Row>> {
    let data = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let n = full.len();
    let vocab = data.len() / n.max(1);
    let greedy: Vec<bool> = full.iter().map(|&f| !f).collect();
    let picks = greedy::pick_rows(&data, &greedy);
    Ok(picks
        .into_iter()
        .enumerate()
        .map(|(i, pick)| match pick {
            // The argmax's logit is the maximum, so its log-probability is -log(sum exp(l - max)).
            Some(p) => p.into(),
            None => Row::Full(data[i * vocab..(i + 1) * vocab].to_vec()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::Sampler;
    use crate::engine::SamplingParams;

    /// Rows read back as argmax + log-normalizer give the token and log-probability the sampler
    /// computes from the whole row; whole rows come back untouched and in order.
    #[test]
    fn device_greedy_rows_match_the_sampler() {
        let dev = candle_core::Device::Cpu;
        let logits = Tensor::randn(0f32, 3.0, (5, 1000), &dev).unwrap();
        let whole = logits.to_vec2::<f32>().unwrap();
        let full = [true, false, false, true, false];
        let rows = read_rows(&logits, &full, None).unwrap();
        for (i, row) in rows.iter().enumerate() {
            match row {
                Row::Full(r) => {
                    assert!(full[i]);
                    assert_eq!(r, &whole[i]);
                }
                Row::Greedy {
                    token,
                    logprob,
                    spread,
                } => {
                    assert!(!full[i]);
                    let mut s = Sampler::new(SamplingParams::greedy());
                    let want = s.sample(&whole[i], &[]);
                    assert_eq!(*token, want.token);
                    assert!(
                        (logprob - want.logprob).abs() < 1e-4,
                        "{logprob} vs {}",
                        want.logprob
                    );
                    assert!((spread.entropy - want.spread.entropy).abs() < 1e-4);
                    assert_eq!(spread.margin, want.spread.margin);
                }
            }
        }
        assert!(read_rows(&logits, &[true], None).is_err());
    }

    /// The reductions a GPU runs (here on the CPU tensor) give the CPU pass's pick.
    #[test]
    fn device_reductions_match_the_cpu_pass() {
        let dev = candle_core::Device::Cpu;
        let logits = Tensor::randn(0f32, 3.0, (4, 5000), &dev).unwrap();
        let whole = logits.to_vec2::<f32>().unwrap();
        for (got, row) in device_picks(&logits).unwrap().iter().zip(&whole) {
            let want = greedy::pick(row);
            assert_eq!(got.token, want.token);
            assert!((got.lse - want.lse).abs() < 1e-4);
            assert!(
                (got.entropy - want.entropy).abs() < 1e-3,
                "{got:?} {want:?}"
            );
            assert!((got.margin - want.margin).abs() < 1e-5, "{got:?} {want:?}");
        }
    }
}
