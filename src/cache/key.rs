//! What makes two requests the same for the response cache, and which requests may be cached.
//!
//! The exact key is a SHA-256 of the canonical JSON of everything that decides the answer: the
//! kind (chat or completion), the model or route as asked, the messages or prompt, every sampling
//! field, the stop strings, whether log-probabilities are asked, and the output grammar. Fields a
//! greedy request ignores (seed, top-k, top-p, min-p) are dropped from it, so they do not split
//! the cache. The semantic key is the same with the last user message left out: a semantic hit
//! needs everything else identical, and the left-out message similar. For a text completion the
//! left-out part is the prompt's last paragraph (after its last blank line).
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::engine::SamplingParams;
use crate::server::validate::{Input, Kind, Validated};

pub type Digest = [u8; 32];

/// A request's cache identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub exact: Digest,
    pub semantic: Digest,
    /// The text the semantic level compares (the last user message, or the prompt); None when
    /// the request has none (a chat ending in another role).
    pub text: Option<String>,
}

/// Why a request is not cached (None: it may be). Only requests whose answer is a function of
/// the request are: greedy or seeded, one choice, one prompt, no tools.
pub fn not_cacheable(req: &Validated) -> Option<&'static str> {
    if req.params.temperature > 0.0 && req.params.seed.is_none() {
        return Some("sampled without a seed");
    }
    if req.n != 1 {
        return Some("n > 1");
    }
    if let Input::Prompts(ps) = &req.input {
        if ps.len() != 1 {
            return Some("several prompts");
        }
    }
    if req.tools.is_some() {
        return Some("tools");
    }
    if req
        .constraint
        .as_ref()
        .is_some_and(|c| c.fingerprint().is_none())
    {
        // Keyed without its grammar, it would share answers with other grammars.
        return Some("grammar without a canonical form");
    }
    None
}

/// The semantic key `semantic` under one embedding model: vectors of different models (or of one
/// name pointing at other weights of another size, or with another adapter merged) never meet in
/// one index, persisted entries included.
pub fn with_embedder(
    semantic: &Digest,
    name: &str,
    dims: usize,
    vocab: usize,
    adapter: &str,
) -> Digest {
    let mut h = Sha256::new();
    h.update(semantic);
    h.update(format!("\0embedder\0{name}\0{dims}\0{vocab}").as_bytes());
    if !adapter.is_empty() {
        // Keys of unadapted models stay what they were (entries persisted before adapters).
        h.update(format!("\0adapter\0{adapter}").as_bytes());
    }
    h.finalize().into()
}

/// The sampling fields as the answer depends on them.
fn sampling(p: &SamplingParams) -> Value {
    let mut p = p.clone();
    if p.temperature == 0.0 {
        // Greedy takes the most likely token: no seed, and filters that always keep it.
        p.seed = None;
        p.top_k = 0;
        p.top_p = 1.0;
        p.min_p = 0.0;
    }
    p.logit_bias.sort_by_key(|b| b.0);
    serde_json::to_value(&p).unwrap_or(Value::Null)
}

fn digest(v: &Value) -> Digest {
    Sha256::digest(v.to_string().as_bytes()).into()
}

pub fn keys(req: &Validated) -> Keys {
    let kind = match req.kind {
        Kind::Chat => "chat",
        Kind::Completion => "completion",
    };
    let (whole, context, text) = match &req.input {
        Input::Chat(ms) => {
            let messages = serde_json::to_value(ms).unwrap_or(Value::Null);
            match ms.split_last() {
                Some((last, earlier)) if last.role == "user" && last.tool_calls.is_none() => (
                    messages,
                    serde_json::to_value(earlier).unwrap_or(Value::Null),
                    Some(last.content.clone()),
                ),
                _ => (messages.clone(), messages, None),
            }
        }
        Input::Prompts(ps) => {
            // A completion prompt's instructions or examples come first, the question last: the
            // last paragraph is compared, everything before it must be identical.
            let prompt = ps.first().map(String::as_str).unwrap_or("");
            let (context, question) = match prompt.rfind("\n\n") {
                Some(at) => prompt.split_at(at + 2),
                None => ("", prompt),
            };
            let text = (!question.trim().is_empty()).then(|| question.to_string());
            (json!(ps), json!(context), text)
        }
    };
    let base = json!({
        "v": 1,
        "kind": kind,
        "model": req.model,
        "params": sampling(&req.params),
        "stops": &*req.stops,
        "logprobs": req.want_logprobs,
        "grammar": req.constraint.as_ref().and_then(|c| c.fingerprint()),
    });
    let with = |field: &str, v: Value| {
        let mut b = base.clone();
        b[field] = v;
        digest(&b)
    };
    Keys {
        exact: with("input", whole),
        semantic: with("context", context),
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::openai::ChatRequest;
    use crate::server::validate;

    fn chat(v: Value) -> Validated {
        let r: ChatRequest = serde_json::from_value(v).unwrap();
        validate::chat(r, &validate::Limits::default()).unwrap()
    }

    fn msgs(system: &str, user: &str) -> Value {
        json!([{"role": "system", "content": system}, {"role": "user", "content": user}])
    }

    #[test]
    fn keys_follow_what_decides_the_answer() {
        let base = json!({"model": "m", "messages": msgs("Be brief.", "Capital of France?"), "temperature": 0});
        let k = keys(&chat(base.clone()));
        assert_eq!(k.text.as_deref(), Some("Capital of France?"));
        // Same request, fields a greedy answer ignores, and streaming: the same keys.
        let mut same = base.clone();
        same["seed"] = json!(7);
        same["top_p"] = json!(0.5);
        same["stream"] = json!(true);
        same["user"] = json!("someone");
        assert_eq!(keys(&chat(same)), k);
        // Another question under the same context: same semantic key, another exact key.
        let mut other = base.clone();
        other["messages"] = msgs("Be brief.", "Capital of Spain?");
        let ko = keys(&chat(other));
        assert_ne!(ko.exact, k.exact);
        assert_eq!(ko.semantic, k.semantic);
        // A different system prompt, model, max_tokens or stop: different keys at both levels.
        for (field, v) in [
            ("messages", msgs("Be verbose.", "Capital of France?")),
            ("model", json!("other")),
            ("max_tokens", json!(5)),
            ("stop", json!(["."])),
            ("logprobs", json!(true)),
        ] {
            let mut b = base.clone();
            b[field] = v;
            let kb = keys(&chat(b));
            assert_ne!(kb.exact, k.exact, "{field}");
            assert_ne!(kb.semantic, k.semantic, "{field}");
        }
        // Seeded sampling: the seed is part of the key.
        let mut s1 = base.clone();
        s1["temperature"] = json!(0.7);
        s1["seed"] = json!(1);
        let mut s2 = s1.clone();
        s2["seed"] = json!(2);
        assert_ne!(keys(&chat(s1)).exact, keys(&chat(s2)).exact);
    }

    #[test]
    fn an_embedding_models_identity_and_adapter_are_part_of_the_semantic_key() {
        let s = [7u8; 32];
        let base = with_embedder(&s, "m", 384, 30522, "");
        // Unadapted keys are what they were before adapters existed.
        let mut h = Sha256::new();
        h.update(s);
        h.update(format!("\0embedder\0m\0{}\0{}", 384, 30522).as_bytes());
        assert_eq!(base, <[u8; 32]>::from(h.finalize()));
        for other in [
            with_embedder(&s, "n", 384, 30522, ""),
            with_embedder(&s, "m", 768, 30522, ""),
            with_embedder(&s, "m", 384, 30522, "0123abcd"),
        ] {
            assert_ne!(other, base);
        }
        assert_ne!(
            with_embedder(&s, "m", 384, 30522, "0123abcd"),
            with_embedder(&s, "m", 384, 30522, "4567ef01")
        );
    }

    #[test]
    fn a_completion_compares_its_last_paragraph_under_the_same_preamble() {
        let complete = |prompt: &str| {
            let r: crate::server::openai::CompletionRequest =
                serde_json::from_value(json!({"model": "m", "prompt": prompt, "temperature": 0}))
                    .unwrap();
            keys(&validate::completion(r, &validate::Limits::default()).unwrap())
        };
        let a = complete("You answer briefly.\n\nQ: Capital of France?\nA:");
        let b = complete("You answer briefly.\n\nQ: Which city is the capital of France?\nA:");
        let c = complete("You answer at length.\n\nQ: Capital of France?\nA:");
        assert_eq!(a.text.as_deref(), Some("Q: Capital of France?\nA:"));
        assert_eq!(a.semantic, b.semantic);
        assert_ne!(a.exact, b.exact);
        assert_ne!(a.semantic, c.semantic);
        let plain = complete("The capital of France is");
        assert_eq!(plain.text.as_deref(), Some("The capital of France is"));
    }

    #[test]
    fn only_deterministic_single_answers_are_cached() {
        let base = json!({"model": "m", "messages": msgs("s", "q")});
        assert_eq!(
            not_cacheable(&chat(base.clone())),
            Some("sampled without a seed")
        );
        let mut t0 = base.clone();
        t0["temperature"] = json!(0);
        assert_eq!(not_cacheable(&chat(t0.clone())), None);
        let mut seeded = base.clone();
        seeded["seed"] = json!(3);
        assert_eq!(not_cacheable(&chat(seeded)), None);
        let mut n2 = t0.clone();
        n2["n"] = json!(2);
        assert_eq!(not_cacheable(&chat(n2)), Some("n > 1"));
        let mut tools = t0.clone();
        tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        assert_eq!(not_cacheable(&chat(tools)), Some("tools"));
    }
}
