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

/// Rows padding a batch up to a CUDA graph's size: each writes its K/V to slot 0 of `sink` (a block
/// no sequence owns) and attends to that one slot. Every pad row computes the same values, so their
/// concurrent writes to the slot agree.
#[derive(Debug, Clone, Copy)]
pub struct Padding {
    pub rows: usize,
    pub sink: u32,
}

/// The per-token sections of `Batch::pack`'s buffer, in their order; the block tables follow them.
#[derive(Debug, Clone, Copy)]
pub enum Packed {
    Ids,
    Positions,
    Slots,
    /// Token -> chunk (the row of its block table).
    Chunks,
}

impl Packed {
    /// Where the section lies in a buffer of `n` tokens.
    pub fn range(self, n: usize) -> std::ops::Range<usize> {
        let i = self as usize;
        i * n..(i + 1) * n
    }

    /// Where the block tables start in a buffer of `n` tokens.
    pub fn tables_from(n: usize) -> usize {
        4 * n
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

    /// The longest block table (at least 1).
    pub fn max_blocks(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// The batch as the CUDA kernels read it, one u32 buffer (one upload): the `Packed` sections,
    /// then the block tables, one row of `max_blocks` (at least the longest table) per chunk; with
    /// `pad` rows (one token each) after the batch's own.
    pub fn pack(&self, max_blocks: usize, pad: Option<Padding>) -> Vec<u32> {
        let (extra, sink) = pad.map_or((0, 0), |p| (p.rows, p.sink));
        let real = self.num_tokens();
        let n = real + extra;
        let rows = self.seqs.len() + extra;
        let mut out = vec![0u32; Packed::tables_from(n) + rows.max(1) * max_blocks];
        out[Packed::Ids.range(n)][..real].copy_from_slice(&self.tokens);
        out[Packed::Positions.range(n)][..real].copy_from_slice(&self.positions);
        let slots = &mut out[Packed::Slots.range(n)];
        slots[..real].copy_from_slice(&self.slot_mapping);
        slots[real..].fill(sink * self.block_size as u32);
        let (head, tables) = out.split_at_mut(Packed::tables_from(n));
        let chunks = &mut head[Packed::Chunks.range(n)];
        // Rows padded to the longest table: a kernel indexes (chunk, block) without offsets.
        for (i, s) in self.seqs.iter().enumerate() {
            tables[i * max_blocks..][..s.block_table.len()].copy_from_slice(&s.block_table);
            chunks[s.start..s.start + s.len].fill(i as u32);
        }
        for p in 0..extra {
            let row = self.seqs.len() + p;
            chunks[real + p] = row as u32;
            tables[row * max_blocks] = sink;
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed layout: each section where the kernels look, tables padded to the width, pad
    /// rows pointing at the sink block's first slot and attending to it alone at position 0.
    #[test]
    fn pack_lays_out_sections_and_pad_rows() {
        let mut b = Batch::new(4);
        b.push(&[7, 8, 9], 2, &[5, 6], true); // positions 2..5: slots 22, 23, 24
        b.push(&[3], 0, &[1], true);
        let got = b.pack(3, Some(Padding { rows: 2, sink: 9 }));
        let n = 6;
        assert_eq!(got.len(), 4 * n + 4 * 3);
        assert_eq!(&got[..n], &[7, 8, 9, 3, 0, 0]);
        assert_eq!(&got[n..2 * n], &[2, 3, 4, 0, 0, 0]);
        assert_eq!(&got[2 * n..3 * n], &[22, 23, 24, 4, 36, 36]);
        assert_eq!(&got[3 * n..4 * n], &[0, 0, 0, 1, 2, 3]);
        assert_eq!(&got[4 * n..], &[5, 6, 0, 1, 0, 0, 9, 0, 0, 9, 0, 0]);
        // Unpadded: the longest table is the width.
        assert_eq!(b.max_blocks(), 2);
        let plain = b.pack(b.max_blocks(), None);
        assert_eq!(plain.len(), 4 * 4 + 2 * 2);
        assert_eq!(&plain[16..], &[5, 6, 1, 0]);
    }
}
