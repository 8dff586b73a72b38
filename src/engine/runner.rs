//! Runs a step plan: one forward over the ragged batch, logits back as host vectors. No policy here.
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::model::{AttentionBackend, Batch, Decoder, KvCache};

use super::scheduler::StepPlan;

pub struct StepOutput {
    /// One row per plan item that wants logits, in plan order.
    pub logits: Vec<Vec<f32>>,
    pub elapsed: Duration,
}

pub struct Runner {
    pub decoder: Decoder,
    pub kv: KvCache,
    pub backend: AttentionBackend,
}

impl Runner {
    pub fn batch(&self, plan: &StepPlan) -> Batch {
        let mut b = Batch::new(self.kv.block_size);
        for it in &plan.items {
            b.push(&it.tokens, it.first_pos, &it.block_table, it.wants_logits);
        }
        b
    }

    pub fn execute(&self, plan: &StepPlan) -> Result<StepOutput> {
        let t0 = Instant::now();
        let batch = self.batch(plan);
        let logits = self.decoder.forward(&batch, &self.kv, self.backend)?;
        let logits = logits.to_vec2::<f32>()?;
        Ok(StepOutput {
            logits,
            elapsed: t0.elapsed(),
        })
    }
}
