//! The x86-64 tiers of the panel kernels: AVX2 (eight columns per register, the reference's own
//! `maddubs` / `madd` integer steps) and AVX-512 VNNI (sixteen columns per register, `vpdpbusd` /
//! `vpdpwssd`). Integer sums are exact whatever their order; every float step is the reference's.
use std::arch::x86_64::*;

use super::{Acts, Format, KActs, Tier, Tile, GROUPS, PANEL, ROWS};

/// The 32-value-block kernels on an x86 tier (not `Portable`).
pub fn kernel_32(tier: Tier, f: Format, t: Tile<Acts>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let wide = tier == Tier::Avx512Vnni;
    match f {
        Format::Q8_0 => std::array::from_fn(|i| match (i < rows, wide) {
            (false, _) => [0.0; PANEL],
            // SAFETY: `cpu_tier` (or a test that checked the same features) picked this tier
            // only if the CPU has AVX-512F, BW and VNNI.
            (true, true) => unsafe { q8_0_avx512(vals, meta, acts[i]) },
            (true, false) => q8_0_avx2(vals, meta, acts[i]),
        }),
        // SAFETY: as above.
        Format::Q5_0 if wide => unsafe { nibbles_avx512::<true>(t) },
        Format::Q5_0 => nibbles_avx2::<true>(t),
        // SAFETY: as above.
        _ if wide => unsafe { nibbles_avx512::<false>(t) },
        _ => nibbles_avx2::<false>(t),
    }
}

/// The super-block kernels on an x86 tier (not `Portable`).
pub fn kernel_k(tier: Tier, f: Format, t: Tile<KActs>) -> [[f32; PANEL]; ROWS] {
    match (tier == Tier::Avx512Vnni, f) {
        // SAFETY: `cpu_tier` (or a test that checked the same features) picked this tier only if
        // the CPU has AVX-512F, BW and VNNI.
        (true, Format::Q4K) => unsafe { q4k_avx512(t) },
        // SAFETY: as above.
        (true, _) => unsafe { q6k_avx512(t) },
        (false, Format::Q4K) => q4k_avx2(t),
        (false, _) => q6k_avx2(t),
    }
}

/// `hsum_order` on eight vectors of lanes: lane l of the result is column l's sum.
macro_rules! hsum_lanes {
    ($add:ident, $acc:expr) => {{
        let a = $acc;
        $add(
            $add($add(a[0], a[4]), $add(a[2], a[6])),
            $add($add(a[1], a[5]), $add(a[3], a[7])),
        )
    }};
}

/// Q8_0, one row, sixteen columns per register: lane l of `acc[g]` is column l's lane g of the
/// reference (`fma(d_w * d_a, group sum, acc)` per block).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub unsafe fn q8_0_avx512(vals: &[u8], meta: &[u8], acts: &[Acts]) -> [f32; PANEL] {
    let f = Format::Q8_0;
    assert!(vals.len() >= acts.len() * f.vals() && meta.len() >= acts.len() * f.meta());
    let mut acc = [_mm512_setzero_ps(); GROUPS];
    for (b, a) in acts.iter().enumerate() {
        // SAFETY: block b's 512 value bytes and 32 scale bytes are inside the slices
        // (asserted above); loads are unaligned.
        unsafe {
            let v = vals.as_ptr().add(b * f.vals());
            let wd = _mm512_cvtph_ps(_mm256_loadu_si256(meta.as_ptr().add(b * f.meta()) as _));
            let d = _mm512_mul_ps(wd, _mm512_set1_ps(a.d));
            for (g, acc_g) in acc.iter_mut().enumerate() {
                let w = _mm512_loadu_si512(v.add(64 * g) as _);
                let q = _mm512_dpbusd_epi32(
                    _mm512_set1_epi32(a.bias[g]),
                    w,
                    _mm512_set1_epi32(a.qs[g]),
                );
                *acc_g = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(q), *acc_g);
            }
        }
    }
    let sum = hsum_lanes!(_mm512_add_ps, acc);
    let mut out = [0f32; PANEL];
    // SAFETY: 16 floats into a 16-float array.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), sum) };
    out
}

/// The AVX2 reference's own instructions (`maddubs` of |w| by the sign-moved activation), eight
/// columns per register, one half panel at a time.
pub fn q8_0_avx2(vals: &[u8], meta: &[u8], acts: &[Acts]) -> [f32; PANEL] {
    let f = Format::Q8_0;
    assert!(vals.len() >= acts.len() * f.vals() && meta.len() >= acts.len() * f.meta());
    let mut out = [0f32; PANEL];
    for h in 0..2 {
        // SAFETY: AVX2, FMA and F16C are enabled at compile time (cfg on the module); each
        // load reads half of block b's group g (32 bytes) or of its scales (16 bytes), inside
        // the slices (asserted above); the store writes 8 floats of `out`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(i8::MIN);
            let mut acc = [_mm256_setzero_ps(); GROUPS];
            for (b, a) in acts.iter().enumerate() {
                let v = vals.as_ptr().add(b * f.vals() + 32 * h);
                let s = meta.as_ptr().add(b * f.meta() + 16 * h);
                let d = _mm256_mul_ps(
                    _mm256_cvtph_ps(_mm_loadu_si128(s as _)),
                    _mm256_set1_ps(a.d),
                );
                for (g, acc_g) in acc.iter_mut().enumerate() {
                    let w = _mm256_xor_si256(_mm256_loadu_si256(v.add(64 * g) as _), flip);
                    let sy = _mm256_sign_epi8(_mm256_set1_epi32(a.qs[g]), w);
                    let q =
                        _mm256_madd_epi16(ones, _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), sy));
                    *acc_g = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), *acc_g);
                }
            }
            let sum = hsum_lanes!(_mm256_add_ps, acc);
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), sum);
        }
    }
    out
}

/// Q4_1 (`Q5 = false`) or Q5_0, up to `ROWS` rows: each block's sixteen columns unpacked once,
/// then per row the exact block sums (`vpdpbusd`) and the reference's float steps.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
// `b` indexes the weight blocks and every row's activation blocks alike.
#[allow(clippy::needless_range_loop)]
pub unsafe fn nibbles_avx512<const Q5: bool>(t: Tile<Acts>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let f = if Q5 { Format::Q5_0 } else { Format::Q4_1 };
    let nb = acts[0].len();
    assert!(vals.len() >= nb * f.vals() && meta.len() >= nb * f.meta());
    assert!(acts.iter().all(|a| a.len() == nb));
    let low = _mm512_set1_epi8(0x0F);
    let fifth = _mm512_set1_epi8(0x10);
    let mut sum = [_mm512_setzero_ps(); ROWS];
    for b in 0..nb {
        // SAFETY: block b's 256 value bytes and its scales, minimums or masks are inside the
        // slices (asserted above); loads are unaligned.
        unsafe {
            let v = vals.as_ptr().add(b * f.vals());
            let m = meta.as_ptr().add(b * f.meta());
            let mut w = [_mm512_setzero_si512(); GROUPS];
            for j in 0..GROUPS / 2 {
                let x = _mm512_loadu_si512(v.add(64 * j) as _);
                w[j] = _mm512_and_si512(x, low);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
            }
            if Q5 {
                for (g, wg) in w.iter_mut().enumerate() {
                    let mask = std::ptr::read_unaligned(m.add(2 * PANEL + 8 * g) as *const u64);
                    *wg = _mm512_or_si512(*wg, _mm512_maskz_mov_epi8(mask, fifth));
                }
            }
            let wd = _mm512_cvtph_ps(_mm256_loadu_si256(m as _));
            let wm = if Q5 {
                _mm512_setzero_ps()
            } else {
                _mm512_cvtph_ps(_mm256_loadu_si256(m.add(2 * PANEL) as _))
            };
            for (r, sum_r) in sum.iter_mut().enumerate().take(rows) {
                let a = &acts[r][b];
                let mut i0 = _mm512_set1_epi32(a.bias[0]);
                let mut i1 = _mm512_setzero_si512();
                for g in (0..GROUPS).step_by(2) {
                    i0 = _mm512_dpbusd_epi32(i0, w[g], _mm512_set1_epi32(a.qs[g]));
                    i1 = _mm512_dpbusd_epi32(i1, w[g + 1], _mm512_set1_epi32(a.qs[g + 1]));
                }
                let sumi = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
                let t = _mm512_mul_ps(_mm512_mul_ps(sumi, wd), _mm512_set1_ps(a.d));
                let step = if Q5 {
                    t
                } else {
                    _mm512_add_ps(t, _mm512_mul_ps(wm, _mm512_set1_ps(a.s)))
                };
                *sum_r = _mm512_add_ps(*sum_r, step);
            }
        }
    }
    let mut out = [[0f32; PANEL]; ROWS];
    for (o, s) in out.iter_mut().zip(sum) {
        // SAFETY: 16 floats into a 16-float array.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), s) };
    }
    out
}

/// `nibbles_avx512` with AVX2: eight columns per register, one half panel at a time, `maddubs`
/// for the byte products (unsigned values of at most 31: no saturation).
// `b` indexes the weight blocks and every row's activation blocks alike.
#[allow(clippy::needless_range_loop)]
pub fn nibbles_avx2<const Q5: bool>(t: Tile<Acts>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let f = if Q5 { Format::Q5_0 } else { Format::Q4_1 };
    let nb = acts[0].len();
    assert!(vals.len() >= nb * f.vals() && meta.len() >= nb * f.meta());
    assert!(acts.iter().all(|a| a.len() == nb));
    let mut out = [[0f32; PANEL]; ROWS];
    for h in 0..2 {
        // SAFETY: AVX2, FMA and F16C are enabled at compile time (cfg on the module); each
        // load reads half of a 64-byte group, of the scales or minimums, or one 64-bit mask of
        // block b, inside the slices (asserted above); the stores write 8 floats of `out`.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut sum = [_mm256_setzero_ps(); ROWS];
            for b in 0..nb {
                let v = vals.as_ptr().add(b * f.vals() + 32 * h);
                let m = meta.as_ptr().add(b * f.meta());
                let mut w = [_mm256_setzero_si256(); GROUPS];
                for j in 0..GROUPS / 2 {
                    let x = _mm256_loadu_si256(v.add(64 * j) as _);
                    w[j] = _mm256_and_si256(x, low);
                    w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
                }
                if Q5 {
                    for (g, wg) in w.iter_mut().enumerate() {
                        let mask = std::ptr::read_unaligned(m.add(2 * PANEL + 8 * g) as *const u64);
                        *wg = _mm256_or_si256(*wg, fifth_bits((mask >> (32 * h)) as u32));
                    }
                }
                let wd = _mm256_cvtph_ps(_mm_loadu_si128(m.add(16 * h) as _));
                let wm = _mm256_cvtph_ps(_mm_loadu_si128(m.add(2 * PANEL + 16 * h) as _));
                for (r, sum_r) in sum.iter_mut().enumerate().take(rows) {
                    let a = &acts[r][b];
                    let mut i = _mm256_set1_epi32(a.bias[0]);
                    for (g, wg) in w.iter().enumerate() {
                        let p = _mm256_maddubs_epi16(*wg, _mm256_set1_epi32(a.qs[g]));
                        i = _mm256_add_epi32(i, _mm256_madd_epi16(p, ones));
                    }
                    let t = _mm256_mul_ps(
                        _mm256_mul_ps(_mm256_cvtepi32_ps(i), wd),
                        _mm256_set1_ps(a.d),
                    );
                    let step = if Q5 {
                        t
                    } else {
                        _mm256_add_ps(t, _mm256_mul_ps(wm, _mm256_set1_ps(a.s)))
                    };
                    *sum_r = _mm256_add_ps(*sum_r, step);
                }
            }
            for (o, s) in out.iter_mut().zip(sum) {
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), s);
            }
        }
    }
    out
}

/// 0x10 in byte i where bit i of `bits` is set.
#[inline(always)]
fn fifth_bits(bits: u32) -> __m256i {
    // SAFETY: AVX2 is enabled at compile time (cfg on the module); register operations only.
    unsafe {
        // Spread byte i / 8 of `bits` to byte i, then test bit i % 8.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

/// `(s, s)` as two i16 in each 32-bit lane, from a lane holding the i32 `s` (the multiplier
/// `madd` / `vpdpwssd` apply to both halves of a pair of i16 products).
macro_rules! pair_lanes {
    ($and:ident, $or:ident, $shl:ident, $set1:ident, $x:expr) => {{
        let x = $x;
        $or($and(x, $set1(0xFFFF)), $shl::<16>(x))
    }};
}

/// Q4_K, up to `ROWS` rows. Nibble register G of a super-block holds group G (sub-block G / 8)
/// in its low nibbles and group G + 32 (sub-block G / 8 + 4) in its high ones; per row and group
/// position t the sixteen columns' lane t of the reference (`sum of scale * group dot product`) is
/// built with `vpmaddubsw` + `vpdpwssd`, exact, and the float steps are the reference's.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // `b` and `r` index weights and every row's blocks alike.
pub unsafe fn q4k_avx512(t: Tile<KActs>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let f = Format::Q4K;
    let nb = acts[0].len();
    assert!(vals.len() >= nb * f.vals() && meta.len() >= nb * f.meta());
    assert!(acts.iter().all(|a| a.len() == nb));
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); 8]; ROWS];
    let mut acc_m = [[_mm512_setzero_ps(); 4]; ROWS];
    for b in 0..nb {
        // SAFETY: every load reads inside block b's 2048 value bytes or 320 scale bytes (asserted
        // above); loads are unaligned.
        unsafe {
            let v = vals.as_ptr().add(b * f.vals());
            let m = meta.as_ptr().add(b * f.meta());
            let xd = _mm512_cvtph_ps(_mm256_loadu_si256(m as _));
            let xmin = _mm512_cvtph_ps(_mm256_loadu_si256(m.add(2 * PANEL) as _));
            let bytes =
                |j: usize| _mm512_cvtepu8_epi32(_mm_loadu_si128(m.add(4 * PANEL + PANEL * j) as _));
            let sc: [__m512i; 8] = std::array::from_fn(|j| {
                pair_lanes!(
                    _mm512_and_si512,
                    _mm512_or_si512,
                    _mm512_slli_epi32,
                    _mm512_set1_epi32,
                    bytes(j)
                )
            });
            let mins: [__m512i; 4] = std::array::from_fn(|i| {
                _mm512_or_si512(bytes(8 + 2 * i), _mm512_slli_epi32::<16>(bytes(9 + 2 * i)))
            });
            for r in 0..rows {
                let a = &acts[r][b];
                let dmin = _mm512_mul_ps(_mm512_set1_ps(-a.d), xmin);
                for (i, acc_i) in acc_m[r].iter_mut().enumerate() {
                    let prod = _mm512_madd_epi16(mins[i], _mm512_set1_epi32(a.sums[i]));
                    *acc_i = _mm512_fmadd_ps(dmin, _mm512_cvtepi32_ps(prod), *acc_i);
                }
            }
            for t in 0..8 {
                let mut lane = [_mm512_setzero_si512(); ROWS];
                for s in 0..4 {
                    let x = _mm512_loadu_si512(v.add(64 * (8 * s + t)) as _);
                    let lo = _mm512_and_si512(x, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(x), low);
                    for r in 0..rows {
                        let a = &acts[r][b];
                        let p = _mm512_maddubs_epi16(lo, _mm512_set1_epi32(a.qs[8 * s + t]));
                        lane[r] = _mm512_dpwssd_epi32(lane[r], p, sc[s]);
                        let p = _mm512_maddubs_epi16(hi, _mm512_set1_epi32(a.qs[8 * (s + 4) + t]));
                        lane[r] = _mm512_dpwssd_epi32(lane[r], p, sc[s + 4]);
                    }
                }
                for r in 0..rows {
                    let d = _mm512_mul_ps(_mm512_set1_ps(acts[r][b].d), xd);
                    acc[r][t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane[r]), acc[r][t]);
                }
            }
        }
    }
    let mut out = [[0f32; PANEL]; ROWS];
    for r in 0..rows {
        let am = acc_m[r];
        let mins = _mm512_add_ps(_mm512_add_ps(am[0], am[2]), _mm512_add_ps(am[1], am[3]));
        let sum = _mm512_add_ps(hsum_lanes!(_mm512_add_ps, acc[r]), mins);
        // SAFETY: 16 floats into a 16-float array.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), sum) };
    }
    out
}

/// Q6_K, up to `ROWS` rows: one byte per value (0..64); per row and group position t, lane t of
/// the reference (`sum of scale * (maddubs(q, a) - maddubs(32, a))` over the eight 32-value
/// chunks) with `vpmaddubsw`, `vpsubw` and `vpdpwssd`, exact, then the reference's float steps.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // `b` and `r` index weights and every row's blocks alike.
pub unsafe fn q6k_avx512(t: Tile<KActs>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let f = Format::Q6K;
    let nb = acts[0].len();
    assert!(vals.len() >= nb * f.vals() && meta.len() >= nb * f.meta());
    assert!(acts.iter().all(|a| a.len() == nb));
    let mut acc = [[_mm512_setzero_ps(); 8]; ROWS];
    for b in 0..nb {
        // SAFETY: every load reads inside block b's 4096 value bytes or 288 scale bytes (asserted
        // above); loads are unaligned.
        unsafe {
            let v = vals.as_ptr().add(b * f.vals());
            let m = meta.as_ptr().add(b * f.meta());
            let xd = _mm512_cvtph_ps(_mm256_loadu_si256(m as _));
            for th in 0..2 {
                // Group position t < 4 takes each chunk's first scale, t >= 4 its second.
                let sc: [__m512i; 8] = std::array::from_fn(|c| {
                    let s = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        m.add(2 * PANEL + PANEL * (2 * c + th)) as _,
                    ));
                    pair_lanes!(
                        _mm512_and_si512,
                        _mm512_or_si512,
                        _mm512_slli_epi32,
                        _mm512_set1_epi32,
                        s
                    )
                });
                for t in 4 * th..4 * th + 4 {
                    let mut lane = [_mm512_setzero_si512(); ROWS];
                    for (c, sc_c) in sc.iter().enumerate() {
                        let w = _mm512_loadu_si512(v.add(64 * (8 * c + t)) as _);
                        for r in 0..rows {
                            let a = &acts[r][b];
                            let p = _mm512_maddubs_epi16(w, _mm512_set1_epi32(a.qs[8 * c + t]));
                            let p = _mm512_sub_epi16(p, _mm512_set1_epi32(a.corr[8 * c + t]));
                            lane[r] = _mm512_dpwssd_epi32(lane[r], p, *sc_c);
                        }
                    }
                    for r in 0..rows {
                        let d = _mm512_mul_ps(_mm512_set1_ps(acts[r][b].d), xd);
                        acc[r][t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lane[r]), acc[r][t]);
                    }
                }
            }
        }
    }
    let mut out = [[0f32; PANEL]; ROWS];
    for r in 0..rows {
        // SAFETY: 16 floats into a 16-float array.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), hsum_lanes!(_mm512_add_ps, acc[r])) };
    }
    out
}

/// `q4k_avx512` with AVX2: eight columns per register, one half panel at a time, `madd` + add for
/// the scaled sums.
#[allow(clippy::needless_range_loop)] // `b` and `r` index weights and every row's blocks alike.
pub fn q4k_avx2(t: Tile<KActs>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let f = Format::Q4K;
    let nb = acts[0].len();
    assert!(vals.len() >= nb * f.vals() && meta.len() >= nb * f.meta());
    assert!(acts.iter().all(|a| a.len() == nb));
    let mut out = [[0f32; PANEL]; ROWS];
    for h in 0..2 {
        // SAFETY: AVX2, FMA and F16C are enabled at compile time (cfg on the module); every load
        // reads half of a 64-byte group, 16 bytes of scales or 8 bytes of 6-bit scales of block b,
        // inside the slices (asserted above); the stores write 8 floats of `out`.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [[_mm256_setzero_ps(); 8]; ROWS];
            let mut acc_m = [[_mm256_setzero_ps(); 4]; ROWS];
            for b in 0..nb {
                let v = vals.as_ptr().add(b * f.vals() + 32 * h);
                let m = meta.as_ptr().add(b * f.meta());
                let xd = _mm256_cvtph_ps(_mm_loadu_si128(m.add(16 * h) as _));
                let xmin = _mm256_cvtph_ps(_mm_loadu_si128(m.add(2 * PANEL + 16 * h) as _));
                let bytes = |j: usize| {
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(m.add(4 * PANEL + PANEL * j + 8 * h) as _))
                };
                let sc: [__m256i; 8] = std::array::from_fn(|j| {
                    pair_lanes!(
                        _mm256_and_si256,
                        _mm256_or_si256,
                        _mm256_slli_epi32,
                        _mm256_set1_epi32,
                        bytes(j)
                    )
                });
                let mins: [__m256i; 4] = std::array::from_fn(|i| {
                    _mm256_or_si256(bytes(8 + 2 * i), _mm256_slli_epi32::<16>(bytes(9 + 2 * i)))
                });
                for r in 0..rows {
                    let a = &acts[r][b];
                    let dmin = _mm256_mul_ps(_mm256_set1_ps(-a.d), xmin);
                    for (i, acc_i) in acc_m[r].iter_mut().enumerate() {
                        let prod = _mm256_madd_epi16(mins[i], _mm256_set1_epi32(a.sums[i]));
                        *acc_i = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(prod), *acc_i);
                    }
                }
                for t in 0..8 {
                    let mut lane = [_mm256_setzero_si256(); ROWS];
                    for s in 0..4 {
                        let x = _mm256_loadu_si256(v.add(64 * (8 * s + t)) as _);
                        let lo = _mm256_and_si256(x, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), low);
                        for r in 0..rows {
                            let a = &acts[r][b];
                            let p = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a.qs[8 * s + t]));
                            lane[r] = _mm256_add_epi32(lane[r], _mm256_madd_epi16(p, sc[s]));
                            let p =
                                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a.qs[8 * (s + 4) + t]));
                            lane[r] = _mm256_add_epi32(lane[r], _mm256_madd_epi16(p, sc[s + 4]));
                        }
                    }
                    for r in 0..rows {
                        let d = _mm256_mul_ps(_mm256_set1_ps(acts[r][b].d), xd);
                        acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lane[r]), acc[r][t]);
                    }
                }
            }
            for r in 0..rows {
                let am = acc_m[r];
                let mins = _mm256_add_ps(_mm256_add_ps(am[0], am[2]), _mm256_add_ps(am[1], am[3]));
                let sum = _mm256_add_ps(hsum_lanes!(_mm256_add_ps, acc[r]), mins);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * h), sum);
            }
        }
    }
    out
}

/// `q6k_avx512` with AVX2: eight columns per register, one half panel at a time.
#[allow(clippy::needless_range_loop)] // `b` and `r` index weights and every row's blocks alike.
pub fn q6k_avx2(t: Tile<KActs>) -> [[f32; PANEL]; ROWS] {
    let (vals, meta, acts, rows) = (t.vals, t.meta, t.acts, t.rows);
    let f = Format::Q6K;
    let nb = acts[0].len();
    assert!(vals.len() >= nb * f.vals() && meta.len() >= nb * f.meta());
    assert!(acts.iter().all(|a| a.len() == nb));
    let mut out = [[0f32; PANEL]; ROWS];
    for h in 0..2 {
        // SAFETY: AVX2, FMA and F16C are enabled at compile time (cfg on the module); every load
        // reads half of a 64-byte group or 16 / 8 bytes of block b's scales, inside the slices
        // (asserted above); the stores write 8 floats of `out`.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 8]; ROWS];
            for b in 0..nb {
                let v = vals.as_ptr().add(b * f.vals() + 32 * h);
                let m = meta.as_ptr().add(b * f.meta());
                let xd = _mm256_cvtph_ps(_mm_loadu_si128(m.add(16 * h) as _));
                for th in 0..2 {
                    let sc: [__m256i; 8] = std::array::from_fn(|c| {
                        let at = 2 * PANEL + PANEL * (2 * c + th) + 8 * h;
                        let s = _mm256_cvtepi8_epi32(_mm_loadl_epi64(m.add(at) as _));
                        pair_lanes!(
                            _mm256_and_si256,
                            _mm256_or_si256,
                            _mm256_slli_epi32,
                            _mm256_set1_epi32,
                            s
                        )
                    });
                    for t in 4 * th..4 * th + 4 {
                        let mut lane = [_mm256_setzero_si256(); ROWS];
                        for (c, sc_c) in sc.iter().enumerate() {
                            let w = _mm256_loadu_si256(v.add(64 * (8 * c + t)) as _);
                            for r in 0..rows {
                                let a = &acts[r][b];
                                let p = _mm256_maddubs_epi16(w, _mm256_set1_epi32(a.qs[8 * c + t]));
                                let p = _mm256_sub_epi16(p, _mm256_set1_epi32(a.corr[8 * c + t]));
                                lane[r] = _mm256_add_epi32(lane[r], _mm256_madd_epi16(p, *sc_c));
                            }
                        }
                        for r in 0..rows {
                            let d = _mm256_mul_ps(_mm256_set1_ps(acts[r][b].d), xd);
                            acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lane[r]), acc[r][t]);
                        }
                    }
                }
            }
            for r in 0..rows {
                _mm256_storeu_ps(
                    out[r].as_mut_ptr().add(8 * h),
                    hsum_lanes!(_mm256_add_ps, acc[r]),
                );
            }
        }
    }
    out
}
