//! The embedding model against an independent reference: all-MiniLM-L6-v2 computed in f64 NumPy
//! from the same weights (`scripts/minilm_reference.py`, which implements sentence-transformers'
//! BERT -> mean pooling -> normalize), stored in tests/data/minilm_reference.json.
mod common;

use candle_core::Device;
use hearth::embedding::Embedder;
use serde_json::Value;

fn embedder() -> Embedder {
    let dir = common::models_dir().join("all-minilm-l6-v2");
    Embedder::load(&dir, &Device::Cpu).expect("all-minilm-l6-v2 loads")
}

fn reference() -> Vec<(String, Vec<u32>, Vec<f32>)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/minilm_reference.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids = r["ids"].as_array().unwrap();
            let emb = r["embedding"].as_array().unwrap();
            (
                r["text"].as_str().unwrap().to_string(),
                ids.iter().map(|x| x.as_u64().unwrap() as u32).collect(),
                emb.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            )
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn tokens_and_vectors_match_the_reference_alone_and_in_a_padded_batch() {
    let e = embedder();
    let refs = reference();
    assert_eq!(e.dims(), 384);
    // The longest reference input is cut at the model's 256 tokens, as sentence-transformers cuts.
    assert!(refs.iter().any(|r| r.1.len() == e.max_tokens()));
    for (text, ids, _) in &refs {
        assert_eq!(&e.tokenize(text).unwrap(), ids, "tokens of {text:?}");
    }
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let batch = e.embed(&texts).unwrap();
    for (i, (text, _, want)) in refs.iter().enumerate() {
        let alone = e.embed(&[text.as_str()]).unwrap().remove(0);
        for (how, got) in [("alone", &alone), ("in a batch", &batch[i])] {
            let c = cosine(got, want);
            assert!(c > 1.0 - 1e-4, "{text:?} {how}: cosine {c}");
            let norm: f64 = got.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{text:?} {how}: norm {norm}");
        }
    }
    // Different texts stay apart: the paraphrase-free pairs are not near-duplicates.
    assert!(cosine(&batch[0], &batch[2]) < 0.9);
}

#[test]
fn bad_inputs_are_refused_not_panicked_on() {
    let e = embedder();
    assert!(e.embed_ids(&[]).is_err());
    assert!(e.embed_ids(&[vec![]]).is_err());
    assert!(e.embed_ids(&[vec![101, 102], vec![]]).is_err());
    assert!(e.embed_ids(&[vec![101; e.max_tokens() + 1]]).is_err());
    assert!(e.embed_ids(&[vec![101, 30522, 102]]).is_err());
}

#[test]
fn token_ids_are_cut_as_the_tokenizer_cuts_a_text() {
    let e = embedder();
    let long = "the quick brown fox jumps over the lazy dog ".repeat(40);
    let whole = e.tokenize_whole(&long).unwrap();
    assert!(whole.len() > e.max_tokens());
    // The tokenizer's own truncation is the reference: text tokens cut, [SEP] kept.
    let cut = e.cut(&whole);
    assert_eq!(cut, e.tokenize(&long).unwrap());
    assert_eq!(cut.len(), e.max_tokens());
    assert_eq!(cut.last(), whole.last());
    // Ids that fit are left alone; ids without the closing token are cut at the bound.
    assert_eq!(e.cut(&whole[..10]), whole[..10].to_vec());
    let open = &whole[..whole.len() - 1];
    assert_eq!(e.cut(open), open[..e.max_tokens()].to_vec());
}

#[test]
fn the_batcher_packs_by_padded_tokens_and_batches_requests_that_wait_together() {
    use hearth::embedding::batcher::{BatchConfig, EmbedHandle};
    let e = embedder();
    let refs = reference();
    let long = refs.iter().find(|r| r.1.len() == e.max_tokens()).unwrap();
    let short: Vec<_> = refs.iter().filter(|r| r.1.len() < 20).collect();
    let h = EmbedHandle::start(
        "minilm",
        e,
        BatchConfig {
            max_batch_tokens: 4096,
            max_waiting: 64,
        },
    )
    .unwrap();
    // 64 inputs of 256 tokens: 16 fit in 4096 padded tokens, so 4 forwards.
    let big = vec![long.1.clone(); 64];
    let big_rx = h.submit(big, "t".into()).unwrap();
    // Queued while those run: one request per short input, three times over.
    let small: Vec<_> = (0..3)
        .flat_map(|_| short.iter())
        .map(|r| (r, h.submit(vec![r.1.clone()], "t".into()).unwrap()))
        .collect();
    let big = big_rx.blocking_recv().unwrap().unwrap();
    assert_eq!(big.vectors.len(), 64);
    for v in &big.vectors {
        assert!(cosine(v, &long.2) > 1.0 - 1e-4);
    }
    let n_small = small.len();
    for (r, rx) in small {
        let got = rx.blocking_recv().unwrap().unwrap();
        assert!(cosine(&got.vectors[0], &r.2) > 1.0 - 1e-4, "{:?}", r.0);
        assert!(got.device > std::time::Duration::ZERO);
    }
    let s = h.stats();
    assert_eq!(s.inputs as usize, 64 + n_small);
    // The short requests waited together and shared forwards: at most two more (the first may
    // have arrived before the long request's last forward began), not one each.
    assert!(
        s.batches <= 4 + 2 && n_small > 6,
        "{} forwards for 64 long inputs and {n_small} short requests",
        s.batches
    );
    assert_eq!(s.waiting, 0);
    assert_eq!(s.tenant_device_nanos.values().sum::<u64>(), s.device_nanos);
}

/// Hearth's CPU encoder against candle-transformers' BERT (the portable path) on the same
/// weights, base and adapted: the same vectors to f32 rounding. And its vectors do not depend on
/// the batch: an input gets the same bits alone as beside others of other lengths.
#[test]
fn the_cpu_encoder_matches_candles_model_and_gives_the_same_bits_in_any_batch() {
    use hearth::embedding::adapter::Adapter;
    let dir = common::models_dir().join("all-minilm-l6-v2");
    let refs = reference();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    for adapter in [None, Some(Adapter::Questions)] {
        let cpu = Embedder::load_adapted(&dir, adapter.as_ref(), &Device::Cpu).unwrap();
        let portable = Embedder::load_portable(&dir, adapter.as_ref(), &Device::Cpu).unwrap();
        assert_eq!(cpu.encoder(), "hearth-cpu");
        assert_eq!(portable.encoder(), "candle-transformers");
        let batch = cpu.embed(&texts).unwrap();
        let want = portable.embed(&texts).unwrap();
        let reversed: Vec<&str> = texts.iter().rev().copied().collect();
        let other = cpu.embed(&reversed).unwrap();
        let mut worst = 0f32;
        for (i, text) in texts.iter().enumerate() {
            let alone = cpu.embed(&[text]).unwrap().remove(0);
            assert_eq!(alone, batch[i], "{text:?}: alone and batched differ");
            let o = &other[texts.len() - 1 - i];
            assert_eq!(o, &batch[i], "{text:?}: another batch");
            for (a, b) in batch[i].iter().zip(&want[i]) {
                worst = worst.max((a - b).abs());
            }
        }
        assert!(
            worst < 2e-6,
            "adapter {adapter:?}: {worst} from candle's model"
        );
        // Token ids may be one token (a text always has [CLS] and [SEP]): alone it is one row.
        let one = vec![2023u32];
        let alone = cpu.embed_ids(std::slice::from_ref(&one)).unwrap();
        let beside = cpu.embed_ids(&[one.clone(), vec![101, 102]]).unwrap();
        assert_eq!(alone[0], beside[0], "a one-token input alone and batched");
        let want = portable.embed_ids(&[one]).unwrap();
        let worst = alone[0].iter().zip(&want[0]).map(|(a, b)| (a - b).abs());
        assert!(worst.fold(0f32, f32::max) < 2e-6);
    }
}

/// The built-in question-matching adapter merged into the weights gives the vectors that the
/// training script's fp64 NumPy reference gives for the merged model
/// (tests/data/question_adapter_reference.json, written with the adapter); and the adapter moves
/// them: the base model's vectors are not the adapted ones.
#[test]
fn the_question_adapter_matches_its_reference_and_changes_the_vectors() {
    use hearth::embedding::adapter::Adapter;
    let dir = common::models_dir().join("all-minilm-l6-v2");
    let adapted = Embedder::load_adapted(&dir, Some(&Adapter::Questions), &Device::Cpu)
        .expect("the adapter fits all-minilm-l6-v2");
    assert!(adapted.adapted());
    let base = embedder();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/question_adapter_reference.json"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let refs = v.as_array().unwrap();
    assert!(refs.len() >= 4);
    for r in refs {
        let text = r["text"].as_str().unwrap();
        let want: Vec<f32> = r["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let got = adapted.embed(&[text]).unwrap().remove(0);
        let c = cosine(&got, &want);
        assert!(c > 1.0 - 1e-4, "{text:?}: cosine {c} to the reference");
        let b = base.embed(&[text]).unwrap().remove(0);
        assert!(
            cosine(&b, &want) < 0.999,
            "{text:?}: the adapter changed nothing"
        );
    }
}

#[test]
fn an_adapter_file_that_is_missing_or_does_not_fit_is_a_clear_error() {
    use hearth::embedding::adapter::Adapter;
    let dir = common::models_dir().join("all-minilm-l6-v2");
    let missing = Adapter::File("/nonexistent/adapter.safetensors".into());
    let err = Embedder::load_adapted(&dir, Some(&missing), &Device::Cpu)
        .err()
        .expect("no such file");
    assert!(
        err.to_string().contains("/nonexistent/adapter.safetensors"),
        "{err}"
    );
    // The model's own weights are no adapter: no `scale`, no `.lora_a` tensors.
    let not_an_adapter = Adapter::File(dir.join("model.safetensors"));
    let err = Embedder::load_adapted(&dir, Some(&not_an_adapter), &Device::Cpu)
        .err()
        .expect("not an adapter");
    assert!(err.to_string().contains("does not fit"), "{err}");
}
