//! The block pool: the one owner of KV block ids and their reference counts.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    ref_counts: Vec<u32>,
    free: VecDeque<u32>,
    /// Free-block count mirrored for readers on other threads (metrics, tests).
    free_gauge: Arc<AtomicUsize>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as u32).collect(),
            free_gauge: Arc::new(AtomicUsize::new(num_blocks)),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_total(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn free_gauge(&self) -> Arc<AtomicUsize> {
        self.free_gauge.clone()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn sync_gauge(&self) {
        self.free_gauge.store(self.free.len(), Ordering::Relaxed);
    }

    /// Grow `table` so it holds `tokens` tokens. All or nothing: on `false` the table is unchanged.
    pub fn append(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop_front() {
                self.ref_counts[b as usize] = 1;
                table.push(b);
            }
        }
        self.sync_gauge();
        true
    }

    /// Release every block of `table` (the one place blocks are freed) and empty it.
    pub fn free(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..) {
            let rc = &mut self.ref_counts[b as usize];
            debug_assert!(*rc > 0, "double free of block {b}");
            *rc = rc.saturating_sub(1);
            if *rc == 0 {
                self.free.push_back(b);
            }
        }
        self.sync_gauge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_is_all_or_nothing_and_free_returns_everything() {
        let mut pool = BlockPool::new(4, 16);
        let mut a = Vec::new();
        assert!(pool.append(&mut a, 33));
        assert_eq!(a.len(), 3);
        let mut b = Vec::new();
        assert!(!pool.append(&mut b, 20));
        assert!(b.is_empty());
        assert_eq!(pool.num_free(), 1);
        assert!(pool.append(&mut a, 48));
        assert_eq!(a.len(), 3);
        pool.free(&mut a);
        assert_eq!(pool.num_free(), 4);
        assert_eq!(pool.free_gauge().load(Ordering::Relaxed), 4);
    }
}
