//! The semantic cache's vector index: unit vectors scanned for the most similar (cosine = dot).
//!
//! Up to `EXACT_SCAN` vectors every one is compared. Above that, each vector also carries a
//! 256-bit sign sketch (random-hyperplane hashing, SimHash: two vectors' sketches differ in about
//! angle / pi of their bits whatever the embedding space's shape), the sketches are scanned by
//! Hamming distance (four popcounts a vector), and only the `CANDIDATES` nearest are compared
//! exactly. A vector above a similarity threshold of 0.8 sits at about 0.2 x 256 = 52 differing
//! bits, far inside the nearest 256 unless hundreds of entries are nearly as close, and then
//! one of those is found. Removal is a swap with the last slot, so eviction is O(1).
use std::sync::OnceLock;

/// Below this many vectors the scan is exact.
pub const EXACT_SCAN: usize = 4096;
/// Vectors compared exactly after the sketch scan.
pub const CANDIDATES: usize = 256;
const WORDS: usize = 4;
const BITS: usize = WORDS * 64;

/// A fixed set of `BITS` random hyperplanes for `dims`-long vectors (the same for every index of
/// that size, so sketches are comparable; made by a seeded generator, no state on disk).
fn hyperplanes(dims: usize) -> &'static [f32] {
    type BySize = std::sync::Mutex<Vec<(usize, &'static [f32])>>;
    static PLANES: OnceLock<BySize> = OnceLock::new();
    let all = PLANES.get_or_init(Default::default);
    let mut all = all
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, p)) = all.iter().find(|(d, _)| *d == dims) {
        return p;
    }
    // SplitMix64 with Box-Muller: a portable, stable sequence (no dependence on a crate's RNG).
    let mut state = 0x5eed_ca11_u64 ^ dims as u64;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let planes: Vec<f32> = (0..BITS * dims)
        .map(|_| {
            let (u, v) = (next().max(1e-300), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    let planes: &'static [f32] = Box::leak(planes.into_boxed_slice());
    all.push((dims, planes));
    planes
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the compiler vectorizes this, and the order is fixed (results do not
    // depend on the CPU).
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// The sign sketch of `v`.
pub fn sketch(v: &[f32]) -> [u64; WORDS] {
    let planes = hyperplanes(v.len());
    let mut out = [0u64; WORDS];
    for (b, plane) in planes.chunks_exact(v.len()).enumerate() {
        if dot(plane, v) >= 0.0 {
            out[b / 64] |= 1 << (b % 64);
        }
    }
    out
}

fn hamming(a: &[u64; WORDS], b: &[u64; WORDS]) -> u32 {
    (0..WORDS).map(|i| (a[i] ^ b[i]).count_ones()).sum()
}

/// Vectors of one length, each with an id.
#[derive(Debug, Default)]
pub struct Index {
    dims: usize,
    vectors: Vec<f32>,
    sketches: Vec<[u64; WORDS]>,
    ids: Vec<u64>,
}

impl Index {
    pub fn new(dims: usize) -> Self {
        Self {
            dims,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Add `v` (a unit vector of `dims`) under `id`; returns its slot, or None (nothing added)
    /// when `v` has another length: such a vector would shift every slot after it.
    pub fn push(&mut self, id: u64, v: &[f32]) -> Option<usize> {
        if v.len() != self.dims {
            return None;
        }
        self.vectors.extend_from_slice(v);
        self.sketches.push(sketch(v));
        self.ids.push(id);
        Some(self.ids.len() - 1)
    }

    /// Remove the vector at `slot`; returns the id that moved into `slot` (the last one), if any.
    pub fn swap_remove(&mut self, slot: usize) -> Option<u64> {
        let last = self.ids.len().checked_sub(1)?;
        if slot > last {
            return None;
        }
        let d = self.dims;
        if slot != last {
            self.vectors.copy_within(last * d..(last + 1) * d, slot * d);
        }
        self.vectors.truncate(last * d);
        self.sketches.swap_remove(slot);
        self.ids.swap_remove(slot);
        (slot != last).then(|| self.ids[slot])
    }

    /// Ids with similarity >= `threshold` to `q`, most similar first.
    pub fn search(&self, q: &[f32], threshold: f32) -> Vec<(u64, f32)> {
        if q.len() != self.dims || self.is_empty() {
            return Vec::new();
        }
        let d = self.dims;
        let score = |slot: usize| dot(&self.vectors[slot * d..(slot + 1) * d], q);
        let mut hits: Vec<(u64, f32)> = if self.len() <= EXACT_SCAN {
            (0..self.len())
                .map(|s| (self.ids[s], score(s)))
                .filter(|h| h.1 >= threshold)
                .collect()
        } else {
            let qs = sketch(q);
            let mut near: Vec<(u32, usize)> = self
                .sketches
                .iter()
                .enumerate()
                .map(|(s, k)| (hamming(k, &qs), s))
                .collect();
            if near.len() > CANDIDATES {
                near.select_nth_unstable(CANDIDATES);
                near.truncate(CANDIDATES);
            }
            near.into_iter()
                .map(|(_, s)| (self.ids[s], score(s)))
                .filter(|h| h.1 >= threshold)
                .collect()
        };
        hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits
    }

    /// Bytes held per vector (for the memory bound).
    pub fn bytes_per_entry(&self) -> usize {
        self.dims * 4 + WORDS * 8 + 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64, dims: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut v: Vec<f32> = (0..dims)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        v
    }

    /// `v` moved towards another random direction so that its cosine with `v` is about `cos`.
    fn near(v: &[f32], seed: u64, cos: f32) -> Vec<f32> {
        let r = unit(seed, v.len());
        let along = dot(&r, v);
        let mut perp: Vec<f32> = r.iter().zip(v).map(|(r, v)| r - along * v).collect();
        let n = perp.iter().map(|x| x * x).sum::<f32>().sqrt();
        perp.iter_mut().for_each(|x| *x /= n);
        let s = (1.0 - cos * cos).sqrt();
        v.iter().zip(&perp).map(|(a, p)| cos * a + s * p).collect()
    }

    #[test]
    fn the_sketch_scan_finds_what_the_exact_scan_finds() {
        let dims = 384;
        let mut big = Index::new(dims);
        for i in 0..(EXACT_SCAN as u64 * 3) {
            big.push(i, &unit(i, dims)).unwrap();
        }
        assert!(big.len() > EXACT_SCAN);
        // Queries near stored vectors, at cosines around a threshold.
        for (k, cos) in [0.97f32, 0.92, 0.88, 0.83].into_iter().enumerate() {
            let target = 1000 + k as u64 * 17;
            let q = near(&unit(target, dims), 99 + k as u64, cos);
            let hits = big.search(&q, 0.8);
            assert_eq!(hits.first().map(|h| h.0), Some(target), "cos {cos}");
            assert!((hits[0].1 - cos).abs() < 1e-3);
        }
        // A query far from everything finds nothing.
        assert!(big.search(&unit(u64::MAX / 3, dims), 0.8).is_empty());
    }

    #[test]
    fn removal_moves_the_last_vector_and_keeps_search_right() {
        let mut ix = Index::new(8);
        for i in 0..4 {
            ix.push(i, &unit(i, 8)).unwrap();
        }
        assert_eq!(ix.swap_remove(1), Some(3));
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.search(&unit(3, 8), 0.999)[0].0, 3);
        assert!(ix.search(&unit(1, 8), 0.999).is_empty());
        assert_eq!(ix.swap_remove(2), None);
        assert_eq!(ix.swap_remove(7), None);
        // A vector of another length is refused and leaves the index as it was.
        assert_eq!(ix.push(9, &unit(9, 16)), None);
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.search(&unit(3, 8), 0.999)[0].0, 3);
    }
}
