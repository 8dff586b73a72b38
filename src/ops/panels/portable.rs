//! The panel kernels in scalar code: the definition the SIMD tiers are tested against, and the
//! kernels of builds without AVX2. Integer sums are exact; the float steps are the AVX2 reference's,
//! lane by lane (`f32::mul_add` where it fuses).
use super::{f16_at, hsum_order, Acts, Format, KActs, Tile, GROUPS, PANEL, ROWS};

/// A panel block's 16 f16 values from byte `at` of its scales region, as f32.
fn halves(meta: &[u8], at: usize) -> [f32; PANEL] {
    std::array::from_fn(|l| f16_at(meta, at + 2 * l))
}

/// Column l's stored byte (or nibble) for value v of a block: `n` values per nibble half.
fn stored(vals: &[u8], nibbles: bool, n: usize, l: usize, v: usize) -> i32 {
    let half = if nibbles { n / 2 } else { n };
    let q = vals[((v % half) / 4) * 64 + 4 * l + v % 4];
    (if !nibbles {
        q
    } else if v < half {
        q & 0x0F
    } else {
        q >> 4
    }) as i32
}

/// Four stored values times the activation's four signed bytes (`a`, little-endian).
fn dot4(w: impl Fn(usize) -> i32, a: i32) -> i32 {
    a.to_le_bytes()
        .iter()
        .enumerate()
        .map(|(i, &b)| w(i) * b as i8 as i32)
        .sum()
}

/// Q8_0, one row: per column eight lane accumulators `fma(d_w * d_a, group sum, acc)`.
pub fn q8_0(vals: &[u8], meta: &[u8], acts: &[Acts]) -> [f32; PANEL] {
    let f = Format::Q8_0;
    let mut acc = [[0f32; GROUPS]; PANEL];
    for (b, a) in acts.iter().enumerate() {
        let (v, m) = (&vals[b * f.vals()..], &meta[b * f.meta()..]);
        let wd = halves(m, 0);
        for (l, acc_l) in acc.iter_mut().enumerate() {
            let d = wd[l] * a.d;
            for (g, acc_g) in acc_l.iter_mut().enumerate() {
                let q = dot4(|i| stored(v, false, 32, l, 4 * g + i), a.qs[g]) + a.bias[g];
                *acc_g = d.mul_add(q as f32, *acc_g);
            }
        }
    }
    acc.map(hsum_order)
}

/// Q4_1 and Q5_0, up to `ROWS` rows: per column `sum += sumi * d_w * d_a (+ m_w * s_a)`.
pub fn nibbles(f: Format, t: Tile<Acts>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let mut out = [[0f32; PANEL]; ROWS];
    for (o, acts) in out.iter_mut().zip(acts).take(rows) {
        for (b, a) in acts.iter().enumerate() {
            let (v, m) = (&vals[b * f.vals()..], &meta[b * f.meta()..]);
            let (wd, wm) = (halves(m, 0), halves(m, 2 * PANEL));
            for (l, o) in o.iter_mut().enumerate() {
                let value = |v5: usize| {
                    let fifth = if f == Format::Q5_0 {
                        let pos = 4 * l + v5 % 4;
                        ((m[2 * PANEL + 8 * (v5 / 4) + pos / 8] >> (pos % 8)) & 1) as i32
                    } else {
                        0
                    };
                    stored(v, true, 32, l, v5) | fifth << 4
                };
                let sumi = a.bias[0]
                    + (0..GROUPS)
                        .map(|g| dot4(|i| value(4 * g + i), a.qs[g]))
                        .sum::<i32>();
                let t = sumi as f32 * wd[l] * a.d;
                *o += if f == Format::Q4_1 {
                    t + wm[l] * a.s
                } else {
                    t
                };
            }
        }
    }
    out
}

/// Q4_K and Q6_K, up to `ROWS` rows: per column eight lane accumulators, lane t holding
/// `sum over sub-blocks of scale * (group t's dot product)` per super-block (Q6_K: per 32 values,
/// the scale of the group's 16), `fma(d_w * d_a, lane, acc)`; Q4_K also four minimum lanes
/// `fma(-d_a * dmin_w, m[2i] S[2i] + m[2i+1] S[2i+1], acc_m)`.
pub fn k(f: Format, t: Tile<KActs>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let q4 = f == Format::Q4K;
    let mut out = [[0f32; PANEL]; ROWS];
    for (o, acts) in out.iter_mut().zip(acts).take(rows) {
        let mut acc = [[0f32; 8]; PANEL];
        let mut acc_m = [[0f32; 4]; PANEL];
        for (b, a) in acts.iter().enumerate() {
            let (v, m) = (&vals[b * f.vals()..], &meta[b * f.meta()..]);
            let wd = halves(m, 0);
            let wmin = halves(m, 2 * PANEL);
            let scales_at = if q4 { 4 * PANEL } else { 2 * PANEL };
            let scale = |j: usize, l: usize| {
                let s = m[scales_at + PANEL * j + l];
                if q4 {
                    s as i32
                } else {
                    s as i8 as i32
                }
            };
            for l in 0..PANEL {
                let mut lanes = [0i32; 8];
                for (t, lane) in lanes.iter_mut().enumerate() {
                    for sb in 0..8 {
                        let g = 8 * sb + t;
                        let s = if q4 {
                            scale(sb, l)
                        } else {
                            scale(2 * sb + t / 4, l)
                        };
                        let w = |i: usize| {
                            let q = stored(v, q4, 256, l, 4 * g + i);
                            if q4 {
                                q
                            } else {
                                q - 32
                            }
                        };
                        *lane += s * dot4(w, a.qs[g]);
                    }
                }
                let d = a.d * wd[l];
                for (t, lane) in lanes.iter().enumerate() {
                    acc[l][t] = d.mul_add(*lane as f32, acc[l][t]);
                }
                if q4 {
                    let dmin = -a.d * wmin[l];
                    for (i, acc_i) in acc_m[l].iter_mut().enumerate() {
                        let pair = |j: usize| (a.sums[i] >> (16 * j)) as i16 as i32;
                        let prod = scale(8 + 2 * i, l) * pair(0) + scale(9 + 2 * i, l) * pair(1);
                        *acc_i = dmin.mul_add(prod as f32, *acc_i);
                    }
                }
            }
        }
        for l in 0..PANEL {
            o[l] = hsum_order(acc[l]);
            if q4 {
                let am = acc_m[l];
                o[l] += (am[0] + am[2]) + (am[1] + am[3]);
            }
        }
    }
    out
}
