//! The block pool: the one owner of KV block ids, their reference counts, and the prefix cache.
//!
//! A full block is named by a chained hash of (its parent block's hash, a salt, its token ids) and kept
//! in a hash -> block index, so a later request with the same prefix under the same salt reuses it.
//! On a hit the tokens, salt and parent are compared too, so a hash collision can never serve wrong KV.
//! A block whose last user is gone stays cached (reference count 0) in least-recently-freed order and
//! is evicted only when the pool needs a block; blocks that hold nothing reusable are handed out first.
//!
//! Where a prompt leaves the cached chain inside a block, the cached block under the same parent that
//! shares the longest run of leading tokens with it lends those slots: they are copied into the
//! sequence's own new block (`BlockCopy`) instead of being computed again. A shared system prompt
//! rarely ends on a block boundary, and questions of one template share their first words, so with
//! whole blocks only about half a block of every shared prefix would be recomputed per request.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::ops::Bound;

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
    /// In `children` under (parent, salt, tokens): it may lend its leading slots.
    lends: bool,
}

/// Copy the first `len` K/V slots of cached block `src` into block `dst` (a sequence's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: u32,
    pub dst: u32,
    pub len: usize,
}

/// One sequence's KV blocks and the prefix-cache chain of its full ones. Only the pool creates,
/// grows and empties it; its one exit is `BlockPool::release` (dropping a non-empty one is a leak,
/// caught in debug builds).
#[derive(Debug, Default)]
pub struct Allocation {
    blocks: Vec<u32>,
    /// Chained hashes of the leading full blocks registered in the prefix index.
    hashes: Vec<u64>,
    /// Prefix-cache namespace: blocks are shared only under the same salt.
    salt: u64,
    /// The cached block lending its leading slots to the block after the matched ones, and how
    /// many: copied before the sequence's first step.
    lend: Option<(u32, usize)>,
    /// The tokens whose K/V the block after the hashed ones holds (with partial reuse): when the
    /// sequence ends, that block stays cached to lend them.
    tail: Vec<u32>,
}

impl Allocation {
    pub fn new(salt: u64) -> Self {
        Self {
            blocks: Vec::new(),
            hashes: Vec::new(),
            salt,
            lend: None,
            tail: Vec::new(),
        }
    }

    /// The copy the step that first runs this sequence must make, once, after `BlockPool::grow`
    /// gave it the block the slots go to. None also when `grow` evicted the lender itself into that
    /// block: the slots are already there.
    pub fn take_copy(&mut self) -> Option<BlockCopy> {
        let (src, len) = self.lend.take()?;
        let dst = self.after_full()?;
        (src != dst).then_some(BlockCopy { src, dst, len })
    }

    /// The block after the last full one: the partly filled tail, or where lent slots go.
    fn after_full(&self) -> Option<u32> {
        self.blocks.get(self.hashes.len()).copied()
    }

    /// The block table, in token order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Leading full blocks in the prefix index (matched, or computed and committed).
    pub fn num_hashed(&self) -> usize {
        self.hashes.len()
    }

    pub fn salt(&self) -> u64 {
        self.salt
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        debug_assert!(
            self.blocks.is_empty() || std::thread::panicking(),
            "{} KV blocks leaked: an allocation was dropped without release",
            self.blocks.len()
        );
    }
}

/// A change to the prefix index, as KV-cache events report it to routers (see `kv_events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// Consecutive full blocks joined the index: their chained hashes, the hash of the block
    /// before the first (None: it starts the prompt), their tokens, and the salt they are under.
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        tokens: Vec<u32>,
        salt: u64,
    },
    /// Blocks left the index (evicted).
    Removed { hashes: Vec<u64> },
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
    /// The indexed blocks by (parent hash, salt), in token order: the one sharing the longest
    /// leading run with a prompt's next block is next to where that block would sort.
    children: HashMap<(u64, u64), BTreeMap<Vec<u32>, u32>>,
    tick: u64,
    caching: bool,
    /// Reuse leading slots of a cached block (`BlockCopy`), not only whole blocks.
    partial: bool,
    /// Index changes not yet taken (None: nobody listens).
    events: Option<Vec<KvEvent>>,
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
        Self {
            block_size,
            meta: vec![Meta::default(); num_blocks],
            // Reversed so blocks are handed out from id 0 up.
            empty: (0..num_blocks as u32).rev().collect(),
            cached: BTreeMap::new(),
            index: HashMap::new(),
            children: HashMap::new(),
            tick: 0,
            caching,
            partial: caching,
            events: None,
        }
    }

    /// Record index changes as `KvEvent`s from now on.
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The index changes since the last call (empty when not recording).
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn removed(&mut self, hash: u64) {
        let Some(ev) = self.events.as_mut() else {
            return;
        };
        // Evictions in one step go out as one event.
        if let Some(KvEvent::Removed { hashes }) = ev.last_mut() {
            hashes.push(hash);
        } else {
            ev.push(KvEvent::Removed { hashes: vec![hash] });
        }
    }

    fn stored(&mut self, hash: u64, parent: u64, salt: u64, tokens: &[u32]) {
        let Some(ev) = self.events.as_mut() else {
            return;
        };
        // A block that continues the last stored run extends it.
        if let Some(KvEvent::Stored {
            hashes,
            tokens: run,
            salt: s,
            ..
        }) = ev.last_mut()
        {
            if *s == salt && hashes.last() == Some(&parent) {
                hashes.push(hash);
                run.extend_from_slice(tokens);
                return;
            }
        }
        ev.push(KvEvent::Stored {
            hashes: vec![hash],
            parent: (parent != ROOT_HASH).then_some(parent),
            tokens: tokens.to_vec(),
            salt,
        });
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Whether prompts may reuse part of a cached block (on by default with caching). Each reuse
    /// copies the lent slots, two small copies per layer: next to nothing on the CPU, where each
    /// recomputed token costs a full pass over the weights. The engine leaves it off on a GPU, where
    /// the copies would be small launches traded against a few prompt tokens (not measured yet).
    pub fn set_partial_reuse(&mut self, on: bool) {
        self.partial = on && self.caching;
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

    /// Whether every block is free or cached (nothing held): true whenever no sequence exists.
    pub fn all_free(&self) -> bool {
        self.num_free() == self.num_total() && self.meta.iter().all(|m| m.ref_count == 0)
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Take one block: an empty one if any, else evict the least recently freed cached one.
    fn take(&mut self) -> Option<u32> {
        let b = match self.empty.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.cached.pop_first()?;
                let m = &mut self.meta[b as usize];
                let mut evicted = None;
                if let Some(h) = m.hash.take() {
                    if self.index.get(&h) == Some(&b) {
                        self.index.remove(&h);
                        evicted = Some(h);
                    }
                }
                if std::mem::take(&mut m.lends) {
                    let key = (m.parent, m.salt);
                    if let Some(kids) = self.children.get_mut(&key) {
                        kids.remove(m.tokens.as_slice());
                        if kids.is_empty() {
                            self.children.remove(&key);
                        }
                    }
                }
                m.tokens.clear();
                m.lru_key = None;
                if let Some(h) = evicted {
                    self.removed(h);
                }
                b
            }
        };
        self.meta[b as usize].ref_count = 1;
        Some(b)
    }

    /// Grow `alloc` so it holds `tokens` tokens. All or nothing: on `false` it is unchanged.
    pub fn grow(&mut self, alloc: &mut Allocation, tokens: usize) -> bool {
        let need = self.blocks_for(tokens).saturating_sub(alloc.blocks.len());
        if need > self.num_free() {
            return false;
        }
        for _ in 0..need {
            if let Some(b) = self.take() {
                alloc.blocks.push(b);
            }
        }
        true
    }

    /// Release every block of `alloc` (the one place blocks are freed) and empty it. Tail blocks are
    /// released first so that, among a sequence's cached blocks, the tail is evicted first.
    pub fn release(&mut self, alloc: &mut Allocation) {
        let tail = std::mem::take(&mut alloc.tail);
        let tail_block = alloc.after_full();
        let parent = alloc.hashes.last().copied().unwrap_or(ROOT_HASH);
        alloc.hashes.clear();
        alloc.lend = None;
        for b in alloc.blocks.drain(..).rev() {
            let m = &mut self.meta[b as usize];
            debug_assert!(m.ref_count > 0, "double free of block {b}");
            m.ref_count = m.ref_count.saturating_sub(1);
            if m.ref_count > 0 {
                continue;
            }
            if self.partial && Some(b) == tail_block && !tail.is_empty() {
                self.lend(b, parent, alloc.salt, &tail);
            }
            let m = &mut self.meta[b as usize];
            if (m.hash.is_some() || m.lends) && self.caching {
                self.tick += 1;
                m.lru_key = Some(self.tick);
                self.cached.insert(self.tick, b);
            } else {
                m.hash = None;
                m.tokens.clear();
                self.empty.push(b);
            }
        }
    }

    /// The chained hashes of the full blocks of `tokens` under `salt`.
    pub fn chain(&self, salt: u64, tokens: &[u32]) -> Vec<u64> {
        let mut parent = ROOT_HASH;
        tokens
            .chunks_exact(self.block_size)
            .map(|chunk| {
                parent = block_hash(parent, salt, chunk);
                parent
            })
            .collect()
    }

    /// How many leading hashes of a chain are in the prefix index now.
    pub fn cached_run(&self, chain: &[u64]) -> usize {
        chain
            .iter()
            .take_while(|h| self.index.contains_key(*h))
            .count()
    }

    /// Start an empty `alloc` with the longest cached prefix of `tokens` under its salt, at most
    /// `max_tokens` long: the chain of cached full blocks, then (with partial reuse) the leading
    /// slots a cached block lends to the next block (`Allocation::take_copy`, once `grow` added it:
    /// an admission that does not fit evicts nothing). Returns the number of tokens reused.
    pub fn match_prefix(
        &mut self,
        alloc: &mut Allocation,
        tokens: &[u32],
        max_tokens: usize,
    ) -> usize {
        debug_assert!(
            alloc.blocks.is_empty(),
            "prefix match into a used allocation"
        );
        if !self.caching || !alloc.blocks.is_empty() {
            return 0;
        }
        let salt = alloc.salt;
        let max_tokens = max_tokens.min(tokens.len());
        let mut parent = ROOT_HASH;
        for chunk in tokens
            .chunks_exact(self.block_size)
            .take(max_tokens / self.block_size)
        {
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
            alloc.blocks.push(b);
            alloc.hashes.push(h);
            parent = h;
        }
        let whole = alloc.blocks.len() * self.block_size;
        if !self.partial || whole >= max_tokens {
            return whole;
        }
        let next = &tokens[whole..tokens.len().min(whole + self.block_size)];
        let Some((src, shared)) = self.longest_sibling(parent, salt, next) else {
            return whole;
        };
        let len = shared.min(max_tokens - whole);
        alloc.lend = Some((src, len));
        whole + len
    }

    /// The indexed block under (`parent`, `salt`) whose tokens share the longest leading run with
    /// `next`, and that run's length (None when no block shares a first token).
    fn longest_sibling(&self, parent: u64, salt: u64, next: &[u32]) -> Option<(u32, usize)> {
        let kids = self.children.get(&(parent, salt))?;
        let after = kids
            .range::<[u32], _>((Bound::Included(next), Bound::Unbounded))
            .next();
        let before = kids
            .range::<[u32], _>((Bound::Unbounded, Bound::Excluded(next)))
            .next_back();
        after
            .into_iter()
            .chain(before)
            .map(|(t, &b)| (b, t.iter().zip(next).take_while(|(a, b)| a == b).count()))
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > 0)
    }

    /// Record that the first `computed` of `tokens` have their K/V written: blocks that became
    /// full join the prefix index, so later requests can reuse them.
    pub fn commit(&mut self, alloc: &mut Allocation, tokens: &[u32], computed: usize) {
        let bs = self.block_size;
        while (alloc.hashes.len() + 1) * bs <= computed.min(tokens.len()) {
            let i = alloc.hashes.len();
            let Some(&block) = alloc.blocks.get(i) else {
                break;
            };
            let parent = alloc.hashes.last().copied().unwrap_or(ROOT_HASH);
            let h = self.register(block, parent, alloc.salt, &tokens[i * bs..(i + 1) * bs]);
            alloc.hashes.push(h);
        }
        if self.partial {
            let start = alloc.hashes.len() * bs;
            let end = computed.min(tokens.len()).max(start);
            alloc.tail.clear();
            alloc.tail.extend_from_slice(&tokens[start..end]);
        }
    }

    /// Index `block`, full with `tokens`, under its chained hash.
    fn register(&mut self, block: u32, parent: u64, salt: u64, tokens: &[u32]) -> u64 {
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
        if self.partial {
            self.lend(block, parent, salt, tokens);
        }
        self.stored(h, parent, salt, tokens);
        h
    }

    /// Makes `block`, whose leading slots hold `tokens` after the chain `parent` (under `salt`), a
    /// lender for partial reuse, unless a block with the same run already is one.
    fn lend(&mut self, block: u32, parent: u64, salt: u64, tokens: &[u32]) {
        let kids = self.children.entry((parent, salt)).or_default();
        if kids.contains_key(tokens) {
            return;
        }
        kids.insert(tokens.to_vec(), block);
        let m = &mut self.meta[block as usize];
        m.parent = parent;
        m.salt = salt;
        m.tokens = tokens.to_vec();
        m.lends = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_changes_come_out_as_events_only_when_recorded() {
        let tokens: Vec<u32> = (0..40).collect();
        let mut quiet = BlockPool::new(4, 16, true);
        let mut a = Allocation::new(1);
        assert!(quiet.grow(&mut a, 40));
        quiet.commit(&mut a, &tokens, 40);
        assert!(quiet.take_events().is_empty());
        quiet.release(&mut a);

        let mut pool = BlockPool::new(3, 16, true);
        pool.record_events();
        let mut a = Allocation::new(1);
        assert!(pool.grow(&mut a, 40));
        // Committed over two steps: one event per step, the second continuing the first's chain.
        pool.commit(&mut a, &tokens, 20);
        pool.commit(&mut a, &tokens, 40);
        let first = pool.take_events();
        let chain = pool.chain(1, &tokens);
        assert_eq!(
            first,
            vec![KvEvent::Stored {
                hashes: chain.clone(),
                parent: None,
                tokens: tokens[..32].to_vec(),
                salt: 1,
            }]
        );
        pool.release(&mut a);
        // Another salt needs blocks: the cached ones are evicted, and say so.
        let mut b = Allocation::new(2);
        assert!(pool.grow(&mut b, 48));
        pool.commit(&mut b, &tokens[..16], 16);
        let events = pool.take_events();
        assert_eq!(events.len(), 2, "{events:?}");
        let KvEvent::Removed { hashes } = &events[0] else {
            panic!("{events:?}")
        };
        let mut evicted = hashes.clone();
        evicted.sort();
        let mut want = chain.clone();
        want.sort();
        assert_eq!(evicted, want);
        assert!(matches!(
            &events[1],
            KvEvent::Stored {
                salt: 2,
                parent: None,
                ..
            }
        ));
        pool.release(&mut b);
    }

    #[test]
    fn grow_is_all_or_nothing_and_release_returns_everything() {
        let mut pool = BlockPool::new(4, 16, true);
        let mut a = Allocation::new(0);
        assert!(pool.grow(&mut a, 33));
        assert_eq!(a.blocks().len(), 3);
        let mut b = Allocation::new(0);
        assert!(!pool.grow(&mut b, 20));
        assert!(b.blocks().is_empty());
        assert_eq!(pool.num_free(), 1);
        assert!(pool.grow(&mut a, 48));
        assert_eq!(a.blocks().len(), 3);
        pool.release(&mut a);
        assert_eq!(pool.num_free(), 4);
        assert!(pool.all_free());
    }

    fn fill(pool: &mut BlockPool, tokens: &[u32], salt: u64) -> Allocation {
        let mut a = Allocation::new(salt);
        assert!(pool.grow(&mut a, tokens.len()));
        pool.commit(&mut a, tokens, tokens.len());
        a
    }

    #[test]
    fn prefixes_are_reused_under_the_same_salt_only() {
        let mut pool = BlockPool::new(8, 4, true);
        let toks: Vec<u32> = (0..10).collect();
        let mut t = fill(&mut pool, &toks, 1);
        pool.release(&mut t);
        assert_eq!(
            pool.num_cached(),
            3,
            "two full blocks and the tail stay cached"
        );
        let mut hit = Allocation::new(1);
        assert_eq!(pool.match_prefix(&mut hit, &toks, 9), 9);
        let mut other = Allocation::new(2);
        assert_eq!(
            pool.match_prefix(&mut other, &toks, usize::MAX),
            0,
            "another salt must not hit"
        );
        let mut diverging = toks.clone();
        diverging[5] = 99;
        let mut partial = Allocation::new(1);
        assert_eq!(
            pool.match_prefix(&mut partial, &diverging, usize::MAX),
            5,
            "the first block matches, and one slot of the second"
        );
        assert!(pool.grow(&mut partial, diverging.len()));
        assert_eq!(partial.take_copy().map(|c| c.len), Some(1));
        for a in [&mut hit, &mut other, &mut partial] {
            pool.release(a);
        }
        assert_eq!(pool.num_free(), 8);
        assert!(pool.all_free());
    }

    #[test]
    fn a_prompt_leaving_the_chain_mid_block_borrows_the_longest_shared_run() {
        let mut pool = BlockPool::new(16, 4, true);
        // Three cached second blocks under the same first one: [4,5,6,7], [4,5,9,9], [4,8,8,8].
        let mut held = Vec::new();
        for second in [[4, 5, 6, 7], [4, 5, 9, 9], [4, 8, 8, 8]] {
            let toks: Vec<u32> = [0, 1, 2, 3].into_iter().chain(second).collect();
            held.push(fill(&mut pool, &toks, 1));
        }
        for a in &mut held {
            pool.release(a);
        }
        let want = [0, 1, 2, 3, 4, 5, 9, 1, 1];
        let mut a = Allocation::new(1);
        assert_eq!(pool.match_prefix(&mut a, &want, want.len() - 1), 7);
        assert!(pool.grow(&mut a, want.len()));
        let c = a.take_copy().expect("a copy");
        assert_eq!(c.len, 3);
        assert_eq!(c.dst, a.blocks()[1]);
        assert_eq!(pool.meta[c.src as usize].tokens, vec![4, 5, 9, 9]);
        assert!(a.take_copy().is_none(), "made once");
        // Capped so the last token is computed: the same 8 tokens reuse 7.
        let mut same = Allocation::new(1);
        let eight = [0, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(pool.match_prefix(&mut same, &eight, 7), 7);
        // Under another salt nothing is lent; without partial reuse only whole blocks are.
        let mut other = Allocation::new(2);
        assert_eq!(pool.match_prefix(&mut other, &want, 8), 0);
        pool.set_partial_reuse(false);
        let mut whole = Allocation::new(1);
        assert_eq!(pool.match_prefix(&mut whole, &want, 8), 4);
        assert!(whole.take_copy().is_none());
        for x in [&mut a, &mut same, &mut other, &mut whole] {
            pool.release(x);
        }
        assert!(pool.all_free());
    }

    #[test]
    fn a_finished_sequences_last_block_lends_what_it_holds() {
        let mut pool = BlockPool::new(8, 4, true);
        let toks = [0, 1, 2, 3, 4, 5, 6];
        let mut a = fill(&mut pool, &toks, 1);
        pool.release(&mut a);
        assert_eq!(pool.num_cached(), 2, "the full block and the tail [4,5,6]");
        // The same prompt again: one whole block, then two of the tail's three slots (the last
        // token is computed).
        let mut again = Allocation::new(1);
        assert_eq!(pool.match_prefix(&mut again, &toks, toks.len() - 1), 6);
        assert!(pool.grow(&mut again, toks.len()));
        assert_eq!(again.take_copy().map(|c| c.len), Some(2));
        pool.release(&mut again);
        // Evicted, it lends nothing more.
        let mut big = Allocation::new(2);
        assert!(pool.grow(&mut big, 32));
        assert!(pool.children.is_empty());
        pool.release(&mut big);
        assert!(pool.all_free());
    }

    #[test]
    fn an_admission_that_does_not_fit_evicts_nothing() {
        let mut pool = BlockPool::new(2, 4, true);
        let mut a = fill(&mut pool, &[0, 1, 2, 3, 4, 5, 6, 7], 1);
        pool.release(&mut a);
        assert_eq!(pool.num_cached(), 2);
        // Reuses 5 tokens (a whole block, then one slot) but needs three blocks for 12 tokens.
        let long = [0, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9];
        let mut b = Allocation::new(1);
        assert_eq!(pool.match_prefix(&mut b, &long, long.len() - 1), 5);
        assert!(!pool.grow(&mut b, long.len()));
        pool.release(&mut b);
        assert_eq!(pool.num_cached(), 2, "both blocks still cached");
        let mut c = Allocation::new(1);
        assert_eq!(pool.match_prefix(&mut c, &long[..8], 7), 5);
        pool.release(&mut c);
    }

    #[test]
    fn an_evicted_block_lends_nothing() {
        let mut pool = BlockPool::new(3, 2, true);
        let mut a = fill(&mut pool, &[1, 2, 3, 4], 0);
        pool.release(&mut a);
        // Two blocks for b: the one empty block, then the oldest cached one, [3,4] (released first).
        let mut b = Allocation::new(0);
        assert!(pool.grow(&mut b, 4));
        let mut c = Allocation::new(0);
        assert_eq!(pool.match_prefix(&mut c, &[1, 2, 3, 9, 9], 4), 2);
        assert!(c.take_copy().is_none());
        pool.release(&mut b);
        pool.release(&mut c);
    }

    #[test]
    fn cached_blocks_are_evicted_last_and_oldest_first() {
        let mut pool = BlockPool::new(4, 2, true);
        let mut a = fill(&mut pool, &[1, 2, 3, 4], 0);
        pool.release(&mut a);
        // Two empty blocks remain: they go before any cached one.
        let mut b = Allocation::new(0);
        assert!(pool.grow(&mut b, 4));
        assert_eq!(pool.num_cached(), 2);
        // The next block evicts a cached one: the tail block (freed first), not the head.
        assert!(pool.grow(&mut b, 6));
        let mut hit = Allocation::new(0);
        assert_eq!(
            pool.match_prefix(&mut hit, &[1, 2, 3, 4], usize::MAX),
            2,
            "the head block survived"
        );
        pool.release(&mut hit);
        pool.release(&mut b);
    }
}
