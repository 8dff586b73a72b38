//! The batch description a model sees: a ragged batch of token chunks, each with its sequence's block
//! table. Models never see sequences or the scheduler, only this.

/// One sequence's chunk of this step's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    /// Index of the chunk's first token in `Batch::tokens`.
    pub start: usize,
    /// Number of tokens in the chunk.
    pub len: usize,
    /// Tokens in the KV cache once this chunk is written (the chunk's last position + 1).
    pub context_len: usize,
    /// The sequence's KV blocks, in position order.
    pub block_table: Vec<u32>,
    /// Whether the chunk's last position needs logits (decode, or the last chunk of a prompt).
    pub wants_logits: bool,
}

impl SeqChunk {
    /// Position of the chunk's first token.
    pub fn first_pos(&self) -> usize {
        self.context_len - self.len
    }
}

#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// KV slot (block id * block size + offset) each token's K/V is written to.
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
    pub block_size: usize,
}

impl Batch {
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            ..Default::default()
        }
    }

    /// Append a chunk of `tokens` at positions `first_pos..`, whose K/V go to the slots `block_table` gives.
    pub fn push(
        &mut self,
        tokens: &[u32],
        first_pos: usize,
        block_table: &[u32],
        wants_logits: bool,
    ) {
        let start = self.tokens.len();
        let bs = self.block_size;
        for (i, &t) in tokens.iter().enumerate() {
            let pos = first_pos + i;
            self.tokens.push(t);
            self.positions.push(pos as u32);
            self.slot_mapping
                .push(block_table[pos / bs] * bs as u32 + (pos % bs) as u32);
        }
        self.seqs.push(SeqChunk {
            start,
            len: tokens.len(),
            context_len: first_pos + tokens.len(),
            block_table: block_table.to_vec(),
            wants_logits,
        });
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Indices (into `tokens`) of the rows whose logits are wanted, in sequence order.
    pub fn logit_rows(&self) -> Vec<u32> {
        self.seqs
            .iter()
            .filter(|s| s.wants_logits)
            .map(|s| (s.start + s.len - 1) as u32)
            .collect()
    }
}
