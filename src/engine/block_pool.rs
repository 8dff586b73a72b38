//! The block pool: the one owner of KV block ids, their reference counts, and the prefix cache.
//!
//! A full block is named by a chained hash of (its parent block's hash, a salt, its token ids) and kept
//! in a hash -> block index, so a later request with the same prefix under the same salt reuses it.
//! On a hit the tokens, salt and parent are compared too, so a hash collision can never serve wrong KV.
//! A block whose last user is gone stays cached (reference count 0) in least-recently-freed order and
//! is evicted only when the pool needs a block; blocks that hold nothing reusable are handed out first.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Default, Clone)]
struct Meta {
    ref_count: u32,
    /// Set once the block is full and registered in the index.
    hash: Option<u64>,
    parent: u64,
    salt: u64,
    tokens: Vec<u32>,
    /// Key in `cached` while the block is cached and unused.
    lru_key: Option<u64>,
}

/// Gauges mirrored for readers on other threads (metrics, tests).
#[derive(Debug, Default)]
pub struct PoolGauges {
    /// Blocks that can be allocated: empty ones plus cached ones nobody uses.
    pub free: AtomicUsize,
    /// Of those, blocks that still hold a reusable prefix.
    pub cached: AtomicUsize,
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    meta: Vec<Meta>,
    /// Free blocks holding nothing reusable.
    empty: Vec<u32>,
    /// Unused blocks that still hold a cached prefix, oldest first.
    cached: BTreeMap<u64, u32>,
    index: HashMap<u64, u32>,
    tick: u64,
    caching: bool,
    gauges: Arc<PoolGauges>,
}

/// The chained hash of a full block.
pub fn block_hash(parent: u64, salt: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    salt.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The hash a prefix chain starts from.
pub const ROOT_HASH: u64 = 0x9e37_79b9_7f4a_7c15;

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        let pool = Self {
            block_size,
            meta: vec![Meta::default(); num_blocks],
            // Reversed so blocks are handed out from id 0 up.
            empty: (0..num_blocks as u32).rev().collect(),
            cached: BTreeMap::new(),
            index: HashMap::new(),
            tick: 0,
            caching,
            gauges: Arc::new(PoolGauges::default()),
        };
        pool.sync();
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    pub fn num_total(&self) -> usize {
        self.meta.len()
    }

    pub fn num_free(&self) -> usize {
        self.empty.len() + self.cached.len()
    }

    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    pub fn gauges(&self) -> Arc<PoolGauges> {
        self.gauges.clone()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn sync(&self) {
        self.gauges.free.store(self.num_free(), Ordering::Relaxed);
        self.gauges
            .cached
            .store(self.cached.len(), Ordering::Relaxed);
    }

    /// Take one block: an empty one if any, else evict the least recently freed cached one.
    fn take(&mut self) -> Option<u32> {
        let b = match self.empty.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.cached.pop_first()?;
                let m = &mut self.meta[b as usize];
                if let Some(h) = m.hash.take() {
                    if self.index.get(&h) == Some(&b) {
                        self.index.remove(&h);
                    }
                }
                m.tokens.clear();
                m.lru_key = None;
                b
            }
        };
        self.meta[b as usize].ref_count = 1;
        Some(b)
    }

    /// Grow `table` so it holds `tokens` tokens. All or nothing: on `false` the table is unchanged.
    pub fn append(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.num_free() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.take() {
                table.push(b);
            }
        }
        self.sync();
        true
    }

    /// Release every block of `table` (the one place blocks are freed) and empty it. Tail blocks are
    /// released first so that, among a sequence's cached blocks, the tail is evicted first.
    pub fn free(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..).rev() {
            let m = &mut self.meta[b as usize];
            debug_assert!(m.ref_count > 0, "double free of block {b}");
            m.ref_count = m.ref_count.saturating_sub(1);
            if m.ref_count > 0 {
                continue;
            }
            if m.hash.is_some() && self.caching {
                self.tick += 1;
                m.lru_key = Some(self.tick);
                self.cached.insert(self.tick, b);
            } else {
                m.hash = None;
                m.tokens.clear();
                self.empty.push(b);
            }
        }
        self.sync();
    }

    /// The longest chain of cached full blocks that starts `tokens` under `salt`, at most `max_blocks`
    /// long. The blocks are referenced for the caller; their hashes come back too.
    pub fn match_prefix(
        &mut self,
        tokens: &[u32],
        salt: u64,
        max_blocks: usize,
    ) -> (Vec<u32>, Vec<u64>) {
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        if !self.caching {
            return (blocks, hashes);
        }
        let mut parent = ROOT_HASH;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = block_hash(parent, salt, chunk);
            let Some(&b) = self.index.get(&h) else { break };
            let m = &mut self.meta[b as usize];
            if m.tokens != chunk || m.salt != salt || m.parent != parent {
                break; // a hash collision: never serve another prefix's KV
            }
            if m.ref_count == 0 {
                if let Some(k) = m.lru_key.take() {
                    self.cached.remove(&k);
                }
            }
            m.ref_count += 1;
            blocks.push(b);
            hashes.push(h);
            parent = h;
        }
        self.sync();
        (blocks, hashes)
    }

    /// Record that `block` is full with `tokens` (its K/V written), so later requests can reuse it.
    pub fn register(&mut self, block: u32, parent: u64, salt: u64, tokens: &[u32]) -> u64 {
        let h = block_hash(parent, salt, tokens);
        if !self.caching {
            return h;
        }
        // If an equal block is already indexed (two requests computed the same prefix at once), keep
        // that one; this block stays private and is freed normally.
        if self.index.contains_key(&h) {
            return h;
        }
        let m = &mut self.meta[block as usize];
        m.hash = Some(h);
        m.parent = parent;
        m.salt = salt;
        m.tokens = tokens.to_vec();
        self.index.insert(h, block);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_is_all_or_nothing_and_free_returns_everything() {
        let mut pool = BlockPool::new(4, 16, true);
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
        assert_eq!(pool.gauges().free.load(Ordering::Relaxed), 4);
    }

    fn fill(pool: &mut BlockPool, tokens: &[u32], salt: u64) -> Vec<u32> {
        let mut table = Vec::new();
        assert!(pool.append(&mut table, tokens.len()));
        let mut parent = ROOT_HASH;
        for (b, chunk) in table.iter().zip(tokens.chunks_exact(pool.block_size())) {
            parent = pool.register(*b, parent, salt, chunk);
        }
        table
    }

    #[test]
    fn prefixes_are_reused_under_the_same_salt_only() {
        let mut pool = BlockPool::new(8, 4, true);
        let toks: Vec<u32> = (0..10).collect();
        let mut t = fill(&mut pool, &toks, 1);
        pool.free(&mut t);
        assert_eq!(pool.num_cached(), 2, "two full blocks stay cached");
        let (hit, _) = pool.match_prefix(&toks, 1, usize::MAX);
        assert_eq!(hit.len(), 2);
        let (other, _) = pool.match_prefix(&toks, 2, usize::MAX);
        assert!(other.is_empty(), "another salt must not hit");
        let mut diverging = toks.clone();
        diverging[5] = 99;
        let (partial, _) = pool.match_prefix(&diverging, 1, usize::MAX);
        assert_eq!(partial.len(), 1, "only the first block matches");
        let (mut hit, mut partial) = (hit, partial);
        pool.free(&mut hit);
        pool.free(&mut partial);
        assert_eq!(pool.num_free(), 8);
    }

    #[test]
    fn cached_blocks_are_evicted_last_and_oldest_first() {
        let mut pool = BlockPool::new(4, 2, true);
        let mut a = fill(&mut pool, &[1, 2, 3, 4], 0);
        pool.free(&mut a);
        // Two empty blocks remain: they go before any cached one.
        let mut b = Vec::new();
        assert!(pool.append(&mut b, 4));
        assert_eq!(pool.num_cached(), 2);
        // The next block evicts a cached one: the tail block (freed first), not the head.
        assert!(pool.append(&mut b, 6));
        let (hit, _) = pool.match_prefix(&[1, 2, 3, 4], 0, usize::MAX);
        assert_eq!(hit.len(), 1, "the head block survived");
    }
}
