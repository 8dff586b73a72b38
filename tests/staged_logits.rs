//! `hearth logits` (the GPU check's side of the comparison): logits computed in three steps per prompt
//! (prefill chunk, chunk over the cached first one, decode) equal those of one whole-prompt forward.
mod common;

use hearth::logits::{stage_ends, staged_logits};
use hearth::model::AttentionBackend;

#[test]
fn staged_logits_equal_whole_prompt_forward() {
    let m = common::load(&common::smollm2());
    let prompts: Vec<Vec<u32>> = common::PROMPTS
        .iter()
        .map(|p| m.tokenizer.encode(p).unwrap())
        .filter(|ids| ids.len() >= 4)
        .collect();
    assert!(prompts.len() >= 3);
    for backend in [AttentionBackend::Cpu, AttentionBackend::Portable] {
        let (infos, rows) = staged_logits(&m, &prompts, backend, 16).unwrap();
        assert_eq!(rows.len(), 3 * prompts.len());
        for (info, row) in infos.iter().zip(&rows) {
            let p = &prompts[info.prompt];
            assert!(stage_ends(p.len()).contains(&info.pos));
            // Reference: the prefix up to this position in one forward.
            let whole = common::last_logits(&m, &p[..=info.pos], backend);
            let diff = common::max_abs_diff(row, &whole);
            // The CPU backend's arithmetic does not depend on how tokens are batched; the portable one
            // sums in a shape-dependent order, and 8-bit activation rounding can amplify that
            // (tests/parity_llama.rs has the measured bound).
            let bound = match backend {
                AttentionBackend::Cpu => 1e-4,
                _ => 1.5,
            };
            assert!(diff < bound, "{backend:?} {info:?}: max diff {diff}");
        }
        // The engine's device-side greedy reductions over these real rows give the host pass's
        // picks (on a GPU build the same check runs there: scripts/gpu_check.py).
        let pc = hearth::logits::pick_check(&rows, &m.decoder.device).unwrap();
        assert_eq!(pc.rows, rows.len());
        assert_eq!(pc.token_mismatches, 0, "{pc:?}");
        assert!(
            pc.lse_max_diff < 1e-3 && pc.entropy_max_diff < 1e-3,
            "{pc:?}"
        );
        assert!(pc.margin_max_diff < 1e-4, "{pc:?}");
    }
    assert!(staged_logits(&m, &[vec![1, 2]], AttentionBackend::Cpu, 16).is_err());
    assert!(staged_logits(&m, &[vec![1, 2, 3, 1 << 30]], AttentionBackend::Cpu, 16).is_err());
}
