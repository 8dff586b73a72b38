//! The response cache: answers of deterministic requests kept per tenant, found again by an exact
//! key (model or route, the messages or prompt, every sampling field) or, with `semantic` on, by a
//! paraphrase of the last user message under an identical context (same model or route, system
//! prompt and earlier turns, sampling fields) whose embedding is similar enough and that passes
//! `guard` (same numbers, polarity and directions).
//!
//! Isolation is by construction: each tenant has its own partition (its own exact map and vector
//! indexes), and a lookup is handed one tenant's partition and nothing else; there is no shared
//! index to filter. Memory is bounded per tenant (`max_mib` of its settings) and in all (the global
//! `max_mib`), evicting the least recently used entries; entries expire after `ttl_secs`.
pub mod guard;
pub mod index;
pub mod inflight;
pub mod key;
pub mod persist;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::router::Decision;
use crate::server::openai::{FinishReason, TokenLogprob};
use index::Index;

/// One level of cache settings (the `[cache]` table's fields, or a tenant's or route's `cache`):
/// what it leaves unset comes from the level below.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    pub exact: Option<bool>,
    pub semantic: Option<bool>,
    pub semantic_threshold: Option<f32>,
    pub ttl_secs: Option<u64>,
    pub max_mib: Option<usize>,
}

/// The similarity a semantic hit needs unless configured otherwise, when the cache embeds with
/// all-MiniLM-L6-v2 and the built-in `questions` adapter (the default): chosen on the seven pair
/// sets of stop 22 (out of fold, the lowest threshold letting at most 1% of near misses through,
/// pooled) and kept for the adapter retrained on ten: on two sets it had not seen, adapters trained
/// without them let fewer near misses through at 0.86 than the seven-set one and hit more
/// paraphrases; on the blind fresh5, 3.2% and 60.0% (benches/RESULTS.md).
pub const QUESTIONS_THRESHOLD: f32 = 0.86;

/// The same with any other embedder: for all-MiniLM-L6-v2 as it is, the highest threshold on the
/// precision / recall curve of benches/cache_pairs.jsonl with no false hit.
pub const DEFAULT_THRESHOLD: f32 = 0.9;

/// The threshold for vectors of `e` when none is configured.
pub fn default_threshold(e: &crate::embedding::Embedder) -> f32 {
    if e.adapter_digest() == crate::embedding::adapter::questions_digest() {
        QUESTIONS_THRESHOLD
    } else {
        DEFAULT_THRESHOLD
    }
}

/// The `[cache]` table: the global settings, and which embedding model the semantic level uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Off by default: a cached answer changes what a client gets.
    pub exact: bool,
    pub semantic: bool,
    /// Default: by the embedding model (`default_threshold`).
    pub semantic_threshold: Option<f32>,
    pub ttl_secs: u64,
    /// Memory for cached answers in all, and the default bound of one tenant's.
    pub max_mib: usize,
    /// The embedding model of the semantic level (default: the first served with an adapter,
    /// which the default models' is tuned for matching questions; else the first served).
    pub embedding_model: Option<String>,
    /// Keep the entries in the ledger's SQLite file, so that a restart keeps the cache.
    pub persist: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            exact: false,
            semantic: false,
            semantic_threshold: None,
            ttl_secs: 3600,
            max_mib: 256,
            embedding_model: None,
            persist: false,
        }
    }
}

/// The longest an entry is kept, whatever `ttl_secs` says (a longer time would overflow the
/// clock's arithmetic; a century is "forever" here).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The settings one request runs under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub exact: bool,
    pub semantic: bool,
    /// None: the embedding model's default.
    pub threshold: Option<f32>,
    pub ttl: Duration,
    /// Bound of the tenant's partition (the global `max_mib`, or the tenant's own).
    pub max_bytes: usize,
    /// Bound of the entries of the request's model or route within the tenant's partition (that
    /// model's or route's `max_mib`, when set).
    pub scope_max_bytes: Option<usize>,
}

impl Policy {
    pub fn on(&self) -> bool {
        self.exact || self.semantic
    }
}

impl CacheConfig {
    /// The global settings, then the route's, then the tenant's (the data's owner has the last
    /// word). `max_mib` bounds what it is set on: all entries (global; also each tenant's unless
    /// the tenant sets its own), one tenant's, or one model's or route's within each tenant.
    pub fn policy(&self, route: Option<&CacheSettings>, tenant: Option<&CacheSettings>) -> Policy {
        let mib = |m: usize| m.saturating_mul(1 << 20);
        let ttl = |s: u64| Duration::from_secs(s).min(MAX_TTL);
        let mut p = Policy {
            exact: self.exact,
            semantic: self.semantic,
            threshold: self.semantic_threshold,
            ttl: ttl(self.ttl_secs),
            max_bytes: mib(self.max_mib),
            scope_max_bytes: route.and_then(|r| r.max_mib).map(mib),
        };
        for s in [route, tenant].into_iter().flatten() {
            p.exact = s.exact.unwrap_or(p.exact);
            p.semantic = s.semantic.unwrap_or(p.semantic);
            p.threshold = s.semantic_threshold.or(p.threshold);
            p.ttl = s.ttl_secs.map_or(p.ttl, ttl);
        }
        p.max_bytes = tenant.and_then(|t| t.max_mib).map_or(p.max_bytes, mib);
        p
    }

    /// Settings out of range are a config error, not a silently different cache.
    pub fn check(settings: &[&CacheSettings], global: &Self) -> crate::Result<()> {
        let thresholds = settings
            .iter()
            .filter_map(|s| s.semantic_threshold)
            .chain(global.semantic_threshold);
        for t in thresholds {
            if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
                return Err(crate::HearthError::Config(format!(
                    "cache: semantic_threshold must be between 0 and 1, not {t}"
                )));
            }
        }
        Ok(())
    }
}

/// A cached answer: what a replay needs to rebuild the response in any shape.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Answer {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    /// Device time the answer took (what a hit saves).
    pub device_ms: f64,
    /// For a route group: the decision that picked the answering model.
    pub route: Option<Decision>,
}

impl Answer {
    fn bytes(&self) -> usize {
        let lps: usize = self
            .logprobs
            .iter()
            .map(|t| {
                2 * t.token.len()
                    + 64
                    + t.top_logprobs
                        .iter()
                        .map(|x| 2 * x.token.len() + 48)
                        .sum::<usize>()
            })
            .sum();
        std::mem::size_of::<Self>()
            + self.text.len()
            + lps
            + if self.route.is_some() { 256 } else { 0 }
    }
}

/// Which level answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    Exact,
    Semantic,
}

impl HitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Semantic => "semantic",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub answer: Arc<Answer>,
    pub kind: HitKind,
    pub similarity: f32,
}

/// What a semantic lookup compares: the last user message and its embedding.
#[derive(Debug, Clone)]
pub struct Query {
    pub text: String,
    pub vector: Vec<f32>,
}

struct Entry {
    answer: Arc<Answer>,
    /// The model or route it answered for.
    scope: Arc<str>,
    exact: key::Digest,
    /// The semantic key, the entry's slot in that key's index, and the text it embedded.
    semantic: Option<(key::Digest, usize, String)>,
    /// Exact keys of requests this entry answered by similarity (see `Partition::aliases`).
    aliases: Vec<key::Digest>,
    bytes: usize,
    tick: u64,
    expires: Instant,
}

/// Candidates above the threshold the guard is asked about, most similar first.
const GUARD_CANDIDATES: usize = 16;

/// Aliases one entry keeps at most, and what one is counted as in the memory bound.
const MAX_ALIASES: usize = 32;
const ALIAS_BYTES: usize = 96;

/// The entries of one model or route within a tenant's partition.
#[derive(Default)]
struct Scope {
    bytes: usize,
    /// Least recently used first.
    lru: BTreeMap<u64, u64>,
}

#[derive(Default)]
struct Partition {
    entries: HashMap<u64, Entry>,
    exact: HashMap<key::Digest, u64>,
    semantic: HashMap<key::Digest, Index>,
    /// A request answered by a semantic hit, by its exact key: the entry and the similarity.
    /// The same wording asked again is the same hit without embedding it again (still only
    /// with the semantic level on, and at or above the request's threshold).
    aliases: HashMap<key::Digest, (u64, f32)>,
    /// Least recently used first.
    lru: BTreeMap<u64, u64>,
    scopes: HashMap<Arc<str>, Scope>,
    expiry: BTreeSet<(Instant, u64)>,
    bytes: usize,
    /// Exact keys of the entries dropped since the last look (for the persisted copy).
    gone: Vec<key::Digest>,
}

impl Partition {
    fn remove(&mut self, id: u64) -> usize {
        let Some(e) = self.entries.remove(&id) else {
            return 0;
        };
        if self.exact.get(&e.exact) == Some(&id) {
            self.exact.remove(&e.exact);
        }
        for a in &e.aliases {
            if self.aliases.get(a).is_some_and(|x| x.0 == id) {
                self.aliases.remove(a);
            }
        }
        if let Some((sk, slot, _)) = &e.semantic {
            if let Some(ix) = self.semantic.get_mut(sk) {
                if let Some(moved) = ix.swap_remove(*slot) {
                    if let Some(m) = self.entries.get_mut(&moved) {
                        if let Some(s) = m.semantic.as_mut() {
                            s.1 = *slot;
                        }
                    }
                }
                if ix.is_empty() {
                    self.semantic.remove(sk);
                }
            }
        }
        self.lru.remove(&e.tick);
        if let Some(sc) = self.scopes.get_mut(&e.scope) {
            sc.lru.remove(&e.tick);
            sc.bytes -= e.bytes;
            if sc.lru.is_empty() {
                self.scopes.remove(&e.scope);
            }
        }
        self.expiry.remove(&(e.expires, id));
        self.bytes -= e.bytes;
        self.gone.push(e.exact);
        e.bytes
    }

    /// Remember that the request with exact key `exact` is answered by entry `id` at
    /// `similarity`; returns the bytes it added.
    fn alias(&mut self, id: u64, exact: key::Digest, similarity: f32) -> usize {
        let Some(e) = self.entries.get_mut(&id) else {
            return 0;
        };
        if e.aliases.len() >= MAX_ALIASES || self.aliases.contains_key(&exact) {
            return 0;
        }
        e.aliases.push(exact);
        e.bytes += ALIAS_BYTES;
        if let Some(sc) = self.scopes.get_mut(&e.scope) {
            sc.bytes += ALIAS_BYTES;
        }
        self.aliases.insert(exact, (id, similarity));
        self.bytes += ALIAS_BYTES;
        ALIAS_BYTES
    }

    fn oldest_tick(&self) -> Option<u64> {
        self.lru.keys().next().copied()
    }

    fn touch(&mut self, id: u64, tick: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            self.lru.remove(&e.tick);
            if let Some(sc) = self.scopes.get_mut(&e.scope) {
                sc.lru.remove(&e.tick);
                sc.lru.insert(tick, id);
            }
            e.tick = tick;
            self.lru.insert(tick, id);
        }
    }

    /// Drop expired entries; returns the bytes freed.
    fn expire(&mut self, now: Instant) -> usize {
        let mut freed = 0;
        while self.expiry.first().is_some_and(|&(at, _)| at <= now) {
            // Taken off the queue first: an id without an entry cannot hold the loop.
            if let Some((_, id)) = self.expiry.pop_first() {
                freed += self.remove(id);
            }
        }
        freed
    }
}

/// One answer to keep, and the bounds it is kept under.
struct Item {
    tenant: Arc<str>,
    scope: Arc<str>,
    exact: key::Digest,
    semantic: key::Digest,
    query: Option<Query>,
    answer: Answer,
    tenant_max: usize,
    scope_max: Option<usize>,
    expires: Instant,
}

#[derive(Default)]
struct Store {
    partitions: HashMap<Arc<str>, Partition>,
    bytes: usize,
    tick: u64,
    next_id: u64,
}

/// Counts since start, for /metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub saved_device_nanos: u64,
}

/// Every tenant's cached answers.
pub struct ResponseCache {
    store: Mutex<Store>,
    /// Requests being generated, which the same request waits for.
    pub inflight: Arc<inflight::InFlight>,
    max_bytes: usize,
    saved_nanos: AtomicU64,
    persist: Option<persist::Persist>,
}

impl ResponseCache {
    /// A cache bounded by `max_bytes` in all.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            store: Mutex::new(Store::default()),
            inflight: Arc::default(),
            max_bytes,
            saved_nanos: AtomicU64::new(0),
            persist: None,
        }
    }

    /// Keep a copy of the entries in `path` (SQLite), starting from the entries it holds.
    pub fn persisted(max_bytes: usize, path: &std::path::Path) -> crate::Result<Self> {
        let saved = persist::load(path, crate::ledger::now_ms())?;
        let cache = Self {
            persist: Some(persist::Persist::start(path)),
            ..Self::new(max_bytes)
        };
        let n = saved.len();
        let now = (Instant::now(), crate::ledger::now_ms());
        for s in saved {
            let ttl = Duration::from_millis(s.expires_ms.saturating_sub(now.1).max(0) as u64);
            let mut st = cache.lock();
            // The bounds of tenants and routes apply again from their next insertion.
            cache.insert(
                &mut st,
                Item {
                    tenant: s.tenant.into(),
                    scope: s.scope.into(),
                    exact: s.exact,
                    semantic: s.semantic,
                    query: s.query.map(|(text, vector)| Query { text, vector }),
                    answer: s.answer,
                    tenant_max: max_bytes,
                    scope_max: None,
                    expires: now.0 + ttl.min(MAX_TTL),
                },
            );
            cache.forget(&mut st);
        }
        if n > 0 {
            tracing::info!(entries = cache.stats().entries, "response cache restored");
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delete the persisted copies of the entries dropped since the last call.
    fn forget(&self, st: &mut Store) {
        for (tenant, p) in st.partitions.iter_mut() {
            for exact in p.gone.drain(..) {
                if let Some(persist) = &self.persist {
                    persist.delete(tenant, exact);
                }
            }
        }
    }

    /// Wait until the persisted copy has caught up, then stop writing it.
    pub fn close(&self) {
        if let Some(p) = &self.persist {
            p.flush();
            p.close();
        }
    }

    /// The tenant's answer for `keys`: the exact level first (when on), then the semantic one
    /// (when on and `query` is given) at `threshold` or above.
    pub fn get(
        &self,
        tenant: &str,
        keys: &key::Keys,
        query: Option<&Query>,
        policy: &Policy,
        threshold: f32,
    ) -> Option<Hit> {
        let now = Instant::now();
        let mut store = self.lock();
        store.tick += 1;
        let tick = store.tick;
        let st = &mut *store;
        let part = st.partitions.get_mut(tenant)?;
        st.bytes -= part.expire(now);
        if !part.gone.is_empty() {
            let gone = std::mem::take(&mut part.gone);
            if let Some(p) = &self.persist {
                gone.into_iter().for_each(|g| p.delete(tenant, g));
            }
        }
        let mut found = None;
        if policy.exact {
            if let Some(&id) = part.exact.get(&keys.exact) {
                found = Some((id, HitKind::Exact, 1.0));
            }
        }
        if let (None, true) = (found, policy.semantic) {
            if let Some(&(id, sim)) = part.aliases.get(&keys.exact) {
                if sim >= threshold && part.entries.contains_key(&id) {
                    found = Some((id, HitKind::Semantic, sim));
                }
            }
        }
        if let (None, true, Some(q)) = (found, policy.semantic, query) {
            if let Some(ix) = part.semantic.get(&keys.semantic) {
                // The guard reads the most similar few only: a partition full of refused near
                // duplicates cannot make a lookup (under the cache's lock) slow.
                found = ix
                    .search(&q.vector, threshold)
                    .into_iter()
                    .take(GUARD_CANDIDATES)
                    .find(|&(id, _)| {
                        part.entries.get(&id).is_some_and(|e| {
                            e.semantic
                                .as_ref()
                                .is_some_and(|(_, _, text)| guard::refuses(text, &q.text).is_none())
                        })
                    })
                    .map(|(id, sim)| (id, HitKind::Semantic, sim));
                // Remembered only where it fits the bounds (a lookup evicts nothing).
                let room = part.bytes + ALIAS_BYTES <= policy.max_bytes
                    && st.bytes + ALIAS_BYTES <= self.max_bytes;
                if let (Some((id, _, sim)), true) = (found, room) {
                    let added = part.alias(id, keys.exact, sim);
                    st.bytes += added;
                }
            }
        }
        let (id, kind, similarity) = found?;
        part.touch(id, tick);
        let answer = part.entries.get(&id)?.answer.clone();
        self.saved_nanos
            .fetch_add((answer.device_ms * 1e6) as u64, Ordering::Relaxed);
        Some(Hit {
            answer,
            kind,
            similarity,
        })
    }

    /// Keep `answer` for the tenant under `keys` (and `query`, for the semantic level) as an
    /// answer of `scope` (the model or route asked for), evicting least recently used entries
    /// beyond the scope's bound, the tenant's and the global one. False when it is too large to
    /// keep.
    pub fn put(
        &self,
        tenant: &Arc<str>,
        scope: &Arc<str>,
        keys: &key::Keys,
        query: Option<Query>,
        answer: Answer,
        policy: &Policy,
    ) -> bool {
        let ttl = policy.ttl.min(MAX_TTL);
        let saved = self.persist.as_ref().map(|_| persist::Saved {
            tenant: tenant.to_string(),
            scope: scope.to_string(),
            exact: keys.exact,
            semantic: keys.semantic,
            query: query.as_ref().map(|q| (q.text.clone(), q.vector.clone())),
            answer: answer.clone(),
            expires_ms: crate::ledger::now_ms()
                .saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64),
        });
        let mut st = self.lock();
        let kept = self.insert(
            &mut st,
            Item {
                tenant: tenant.clone(),
                scope: scope.clone(),
                exact: keys.exact,
                semantic: keys.semantic,
                query,
                answer,
                tenant_max: policy.max_bytes,
                scope_max: policy.scope_max_bytes,
                expires: Instant::now() + ttl,
            },
        );
        // Deletions first: a replaced entry's row has the new entry's key.
        self.forget(&mut st);
        st.partitions.retain(|_, p| !p.entries.is_empty());
        if let (true, Some(p), Some(s)) = (kept, &self.persist, saved) {
            p.put(s);
        }
        kept
    }

    /// The insertion itself; false when the answer is too large to keep.
    fn insert(&self, st: &mut Store, item: Item) -> bool {
        let now = Instant::now();
        let answer = Arc::new(item.answer);
        st.tick += 1;
        st.next_id += 1;
        let (tick, id) = (st.tick, st.next_id);
        // Expired entries of every tenant go first (idle tenants too).
        for p in st.partitions.values_mut() {
            st.bytes -= p.expire(now);
        }
        let part = st.partitions.entry(item.tenant).or_default();
        if let Some(&old) = part.exact.get(&item.exact) {
            st.bytes -= part.remove(old);
        }
        let mut bytes = answer.bytes() + 2 * std::mem::size_of::<key::Digest>() + 160;
        let sk = item.semantic;
        let semantic = item.query.and_then(|q| {
            let ix = part
                .semantic
                .entry(sk)
                .or_insert_with(|| Index::new(q.vector.len()));
            // A vector of another length (an index left by another embedding model) is not
            // comparable: the entry keeps its exact level only.
            let slot = ix.push(id, &q.vector)?;
            bytes += ix.bytes_per_entry() + q.text.len();
            Some((sk, slot, q.text))
        });
        if bytes > item.tenant_max.min(self.max_bytes) || item.scope_max.is_some_and(|m| bytes > m)
        {
            // Larger than a bound on its own: not kept (and nothing else evicted for it).
            if let Some((sk, slot, _)) = &semantic {
                if let Some(ix) = part.semantic.get_mut(sk) {
                    ix.swap_remove(*slot);
                    if ix.is_empty() {
                        part.semantic.remove(sk);
                    }
                }
            }
            return false;
        }
        let scope = part.scopes.entry(item.scope.clone()).or_default();
        scope.lru.insert(tick, id);
        scope.bytes += bytes;
        part.entries.insert(
            id,
            Entry {
                answer,
                scope: item.scope.clone(),
                exact: item.exact,
                semantic,
                aliases: Vec::new(),
                bytes,
                tick,
                expires: item.expires,
            },
        );
        part.exact.insert(item.exact, id);
        part.lru.insert(tick, id);
        part.expiry.insert((item.expires, id));
        part.bytes += bytes;
        st.bytes += bytes;
        if let Some(max) = item.scope_max {
            while let Some(sc) = part.scopes.get(&item.scope).filter(|sc| sc.bytes > max) {
                let Some(&oldest) = sc.lru.values().next() else {
                    break;
                };
                st.bytes -= part.remove(oldest);
            }
        }
        while part.bytes > item.tenant_max {
            let Some(oldest) = part.lru.values().next().copied() else {
                break;
            };
            st.bytes -= part.remove(oldest);
        }
        while st.bytes > self.max_bytes {
            let oldest = st
                .partitions
                .iter()
                .filter_map(|(t, p)| p.oldest_tick().map(|k| (k, t.clone())))
                .min();
            let Some((tick, t)) = oldest else { break };
            if let Some(p) = st.partitions.get_mut(&t) {
                if let Some(&id) = p.lru.get(&tick) {
                    st.bytes -= p.remove(id);
                }
            }
        }
        true
    }

    pub fn stats(&self) -> CacheStats {
        let store = self.lock();
        CacheStats {
            entries: store.partitions.values().map(|p| p.entries.len()).sum(),
            bytes: store.bytes,
            saved_device_nanos: self.saved_nanos.load(Ordering::Relaxed),
        }
    }

    /// Entries of one tenant (for tests and the admin view).
    pub fn tenant_entries(&self, tenant: &str) -> usize {
        self.lock()
            .partitions
            .get(tenant)
            .map_or(0, |p| p.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> Answer {
        Answer {
            text: text.into(),
            logprobs: Vec::new(),
            reason: FinishReason::Stop,
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_tokens: 0,
            device_ms: 100.0,
            route: None,
        }
    }

    fn keys(exact: u8, semantic: u8) -> key::Keys {
        key::Keys {
            exact: [exact; 32],
            semantic: [semantic; 32],
            text: None,
        }
    }

    fn unit(dims: usize, hot: usize, spill: f32) -> Vec<f32> {
        let mut v = vec![0f32; dims];
        v[hot] = 1.0;
        v[(hot + 1) % dims] = spill;
        let n = (1.0 + spill * spill).sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    fn policy(max_bytes: usize, ttl: Duration) -> Policy {
        Policy {
            exact: true,
            semantic: true,
            threshold: Some(0.9),
            ttl,
            max_bytes,
            scope_max_bytes: None,
        }
    }

    #[test]
    fn tenants_never_see_each_others_entries() {
        let c = ResponseCache::new(1 << 20);
        let p = policy(1 << 20, Duration::from_secs(60));
        let q = Query {
            text: "What is the capital of France?".into(),
            vector: unit(16, 0, 0.0),
        };
        c.put(
            &"a".into(),
            &"m".into(),
            &keys(1, 2),
            Some(q.clone()),
            answer("Paris"),
            &p,
        );
        let hit = c.get("a", &keys(1, 2), None, &p, 0.9).unwrap();
        assert_eq!(
            (hit.kind, hit.answer.text.as_str()),
            (HitKind::Exact, "Paris")
        );
        assert!(c.get("b", &keys(1, 2), Some(&q), &p, 0.0).is_none());
        // Semantic: a near vector under the same semantic key, and never across tenants.
        let near = Query {
            text: "what's the capital of France".into(),
            vector: unit(16, 0, 0.2),
        };
        let hit = c.get("a", &keys(9, 2), Some(&near), &p, 0.9).unwrap();
        assert_eq!(hit.kind, HitKind::Semantic);
        assert!(hit.similarity > 0.97 && hit.similarity < 0.99);
        // (Each request its own exact key: a wording found once is remembered by it.)
        assert!(c.get("a", &keys(10, 3), Some(&near), &p, 0.9).is_none());
        assert!(c.get("a", &keys(11, 2), Some(&near), &p, 0.99).is_none());
        assert!(c.get("b", &keys(9, 2), Some(&near), &p, 0.0).is_none());
        // The guard: a different number is not a hit however similar.
        let number = Query {
            text: "What is the capital of France in 1800?".into(),
            vector: unit(16, 0, 0.01),
        };
        assert!(c.get("a", &keys(12, 2), Some(&number), &p, 0.9).is_none());
        assert_eq!(c.stats().entries, 1);
        assert!(c.stats().saved_device_nanos >= 200_000_000);
    }

    #[test]
    fn memory_bounds_evict_least_recently_used_first() {
        let one = answer("x").bytes() + 2 * 32 + 160;
        // Room for three entries per tenant, five in all.
        let c = ResponseCache::new(5 * one + one / 2);
        let p = policy(3 * one + one / 2, Duration::from_secs(60));
        let a: Arc<str> = "a".into();
        for k in 1..=3 {
            c.put(&a, &"m".into(), &keys(k, 0), None, answer("x"), &p);
        }
        // Using 1 makes 2 the least recently used; a fourth entry evicts 2.
        assert!(c.get("a", &keys(1, 0), None, &p, 1.0).is_some());
        c.put(&a, &"m".into(), &keys(4, 0), None, answer("x"), &p);
        assert_eq!(c.tenant_entries("a"), 3);
        assert!(c.get("a", &keys(2, 0), None, &p, 1.0).is_none());
        for k in [1, 3, 4] {
            assert!(c.get("a", &keys(k, 0), None, &p, 1.0).is_some(), "{k}");
        }
        // Another tenant's entries push the total over five: the globally oldest go.
        let b: Arc<str> = "b".into();
        for k in 1..=3 {
            c.put(&b, &"m".into(), &keys(k, 0), None, answer("x"), &p);
        }
        assert_eq!(c.stats().entries, 5);
        assert!(c.stats().bytes <= 5 * one + one / 2);
        assert_eq!(c.tenant_entries("b"), 3);
        // An answer larger than the bound is not kept at all.
        c.put(
            &b,
            &"m".into(),
            &keys(9, 0),
            None,
            answer(&"y".repeat(10 * one)),
            &p,
        );
        assert!(c.get("b", &keys(9, 0), None, &p, 1.0).is_none());
        assert_eq!(c.stats().entries, 5);
    }

    #[test]
    fn entries_expire_after_their_ttl_and_a_new_answer_replaces_an_old_one() {
        let c = ResponseCache::new(1 << 20);
        let short = policy(1 << 20, Duration::from_millis(30));
        let a: Arc<str> = "a".into();
        let q = Query {
            text: "q".into(),
            vector: unit(8, 1, 0.0),
        };
        c.put(
            &a,
            &"m".into(),
            &keys(1, 1),
            Some(q.clone()),
            answer("old"),
            &short,
        );
        assert!(c.get("a", &keys(1, 1), None, &short, 1.0).is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.get("a", &keys(1, 1), Some(&q), &short, 0.5).is_none());
        assert_eq!(c.stats().entries, 0);
        assert_eq!(c.stats().bytes, 0);
        let long = policy(1 << 20, Duration::from_secs(60));
        c.put(
            &a,
            &"m".into(),
            &keys(1, 1),
            Some(q.clone()),
            answer("one"),
            &long,
        );
        c.put(
            &a,
            &"m".into(),
            &keys(1, 1),
            Some(q.clone()),
            answer("two"),
            &long,
        );
        assert_eq!(c.tenant_entries("a"), 1);
        let hit = c.get("a", &keys(5, 1), Some(&q), &long, 0.99).unwrap();
        assert_eq!(hit.answer.text, "two");
    }

    #[test]
    fn the_persisted_copy_follows_evictions_and_replacements() {
        let dir = std::env::temp_dir().join(format!("hearth-cache-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("usage.sqlite3");
        let one = answer("x").bytes() + 2 * 32 + 160;
        let p = policy(2 * one + one / 2, Duration::from_secs(60));
        let a: Arc<str> = "a".into();
        let c = ResponseCache::persisted(1 << 20, &path).unwrap();
        for k in 1..=3 {
            c.put(&a, &"m".into(), &keys(k, 0), None, answer("x"), &p);
        }
        c.put(&a, &"m".into(), &keys(3, 0), None, answer("y"), &p);
        c.close();
        // 1 was evicted, 3 replaced: the file holds 2 and the new 3.
        let saved = persist::load(&path, crate::ledger::now_ms()).unwrap();
        let mut got: Vec<(u8, String)> = saved
            .iter()
            .map(|s| (s.exact[0], s.answer.text.clone()))
            .collect();
        got.sort();
        assert_eq!(got, [(2, "x".to_string()), (3, "y".to_string())]);
        let back = ResponseCache::persisted(1 << 20, &path).unwrap();
        let hit = back.get("a", &keys(3, 0), None, &p, 1.0).unwrap();
        assert_eq!(hit.answer.text, "y");
        assert!(back.get("b", &keys(3, 0), None, &p, 1.0).is_none());
        back.close();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn vectors_of_another_length_keep_only_their_exact_level() {
        // As after a restart that restored entries made by an embedding model of another size.
        let c = ResponseCache::new(1 << 20);
        let p = policy(1 << 20, Duration::from_millis(30));
        let a: Arc<str> = "a".into();
        let q = |dims: usize| Query {
            text: "q".into(),
            vector: unit(dims, 0, 0.0),
        };
        c.put(
            &a,
            &"m".into(),
            &keys(1, 7),
            Some(q(8)),
            answer("eight"),
            &p,
        );
        c.put(
            &a,
            &"m".into(),
            &keys(2, 7),
            Some(q(16)),
            answer("sixteen"),
            &p,
        );
        c.put(
            &a,
            &"m".into(),
            &keys(3, 7),
            Some(q(8)),
            answer("eight too"),
            &p,
        );
        assert_eq!(c.tenant_entries("a"), 3);
        let hit = c.get("a", &keys(2, 7), Some(&q(16)), &p, 0.9).unwrap();
        assert_eq!(
            (hit.kind, hit.answer.text.as_str()),
            (HitKind::Exact, "sixteen")
        );
        assert!(c.get("a", &keys(9, 7), Some(&q(16)), &p, 0.9).is_none());
        assert_eq!(
            c.get("a", &keys(9, 7), Some(&q(8)), &p, 0.9).unwrap().kind,
            HitKind::Semantic
        );
        // Expiry and removal of all three go through without a panic or a stuck queue.
        std::thread::sleep(Duration::from_millis(50));
        assert!(c.get("a", &keys(1, 7), Some(&q(8)), &p, 0.9).is_none());
        assert_eq!((c.stats().entries, c.stats().bytes), (0, 0));
    }

    #[test]
    fn a_routes_bound_evicts_its_own_entries_only() {
        let one = answer("x").bytes() + 2 * 32 + 160;
        let c = ResponseCache::new(1 << 20);
        let wide = policy(1 << 20, Duration::from_secs(60));
        let narrow = Policy {
            scope_max_bytes: Some(2 * one + one / 2),
            ..wide
        };
        let a: Arc<str> = "a".into();
        let (big, small): (Arc<str>, Arc<str>) = ("big".into(), "small".into());
        for k in 1..=4 {
            c.put(&a, &big, &keys(k, 0), None, answer("x"), &wide);
        }
        for k in 11..=14 {
            c.put(&a, &small, &keys(k, 0), None, answer("x"), &narrow);
        }
        // The small route keeps its two newest; the other route's four stay.
        assert_eq!(c.tenant_entries("a"), 6);
        for k in [1, 2, 3, 4, 13, 14] {
            assert!(c.get("a", &keys(k, 0), None, &wide, 1.0).is_some(), "{k}");
        }
        for k in [11, 12] {
            assert!(c.get("a", &keys(k, 0), None, &wide, 1.0).is_none(), "{k}");
        }
    }

    #[test]
    fn a_ttl_beyond_the_clocks_range_is_kept_a_century() {
        let g = CacheConfig {
            exact: true,
            ttl_secs: u64::MAX,
            max_mib: usize::MAX,
            ..Default::default()
        };
        let p = g.policy(None, None);
        assert_eq!(p.ttl, MAX_TTL);
        assert_eq!(p.max_bytes, usize::MAX);
        let c = ResponseCache::new(1 << 20);
        c.put(&"a".into(), &"m".into(), &keys(1, 0), None, answer("x"), &p);
        assert!(c.get("a", &keys(1, 0), None, &p, 1.0).is_some());
    }

    #[test]
    fn a_wording_answered_by_similarity_is_found_again_without_its_vector() {
        let c = ResponseCache::new(1 << 20);
        let p = policy(1 << 20, Duration::from_millis(40));
        let a: Arc<str> = "a".into();
        let stored = Query {
            text: "What is the capital of France?".into(),
            vector: unit(16, 0, 0.0),
        };
        c.put(
            &a,
            &"m".into(),
            &keys(1, 2),
            Some(stored),
            answer("Paris"),
            &p,
        );
        let para = Query {
            text: "what's the capital of France".into(),
            vector: unit(16, 0, 0.2),
        };
        let first = c.get("a", &keys(9, 2), Some(&para), &p, 0.9).unwrap();
        assert_eq!(first.kind, HitKind::Semantic);
        // The same wording again: a semantic hit at the same similarity, no vector needed.
        let again = c.get("a", &keys(9, 2), None, &p, 0.9).unwrap();
        assert_eq!(
            (again.kind, again.similarity),
            (first.kind, first.similarity)
        );
        // Not above the similarity it was found at, not with the semantic level off, not for
        // another tenant.
        assert!(c.get("a", &keys(9, 2), None, &p, 0.99).is_none());
        let exact_only = Policy {
            semantic: false,
            ..p
        };
        assert!(c.get("a", &keys(9, 2), None, &exact_only, 0.9).is_none());
        assert!(c.get("b", &keys(9, 2), None, &p, 0.9).is_none());
        // Gone with its entry.
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get("a", &keys(9, 2), None, &p, 0.9).is_none());
        assert_eq!((c.stats().entries, c.stats().bytes), (0, 0));
    }

    #[test]
    fn settings_layer_global_route_then_tenant() {
        let g = CacheConfig {
            exact: true,
            ..Default::default()
        };
        let route = CacheSettings {
            semantic: Some(true),
            semantic_threshold: Some(0.95),
            ..Default::default()
        };
        let tenant = CacheSettings {
            exact: Some(false),
            max_mib: Some(8),
            ..Default::default()
        };
        let p = g.policy(Some(&route), Some(&tenant));
        assert!(!p.exact && p.semantic);
        assert_eq!(p.threshold, Some(0.95));
        assert_eq!(g.policy(None, None).threshold, None);
        assert_eq!(p.max_bytes, 8 << 20);
        assert_eq!(p.scope_max_bytes, None);
        // A route's max_mib bounds that route's entries, not the tenant's partition.
        let bounded = CacheSettings {
            max_mib: Some(2),
            ..route.clone()
        };
        let p = g.policy(Some(&bounded), None);
        assert_eq!((p.max_bytes, p.scope_max_bytes), (256 << 20, Some(2 << 20)));
        assert!(!CacheConfig::default().policy(None, None).on());
        let bad = CacheSettings {
            semantic_threshold: Some(1.5),
            ..Default::default()
        };
        assert!(CacheConfig::check(&[&bad], &g).is_err());
    }
}
