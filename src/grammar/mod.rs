//! Constrained decoding: a request's output format (a JSON schema, any JSON object, a regular
//! expression or a Lark grammar) becomes a grammar that llguidance turns into a token mask at every
//! step. The grammar is checked once when the request is validated (against a byte-level
//! vocabulary, before any tokenization); each model that runs the request compiles it again for
//! its own vocabulary, and each sequence keeps a matcher that follows its tokens.
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::error::{HearthError, Result};
use crate::text::Tokenizer;

mod numbers;
mod schema;

pub use schema::close_objects;

use numbers::{DigitTokens, NumberCap};

/// A request's output constraint, checked and ready to compile for any model.
#[derive(Debug, Clone)]
pub struct Constraint {
    grammar: Arc<TopLevelGrammar>,
    /// What the client asked for, for logs and errors (`json_schema`, `regex`, ...).
    pub kind: &'static str,
    /// The output is JSON (its numbers' digits are capped).
    json: bool,
}

impl Constraint {
    /// The grammar as canonical text: equal for equal constraints (the response cache's key);
    /// None if it cannot be written out (then it has no key, and the request is not cached).
    pub fn fingerprint(&self) -> Option<String> {
        let grammar = serde_json::to_string(&*self.grammar).ok()?;
        Some(format!("{}:{grammar}", self.kind))
    }
}

impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.grammar, &other.grammar)
    }
}

/// JSON is generated compact (`{"a": 1, "b": [2, 3]}`): a small model let free with whitespace can
/// spend its tokens on newlines and indentation, or never leave them.
fn compact(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

impl Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object() -> Result<Self> {
        Self::json_schema(json!({"type": "object"}))
    }

    /// Output that validates against `schema`. An invalid schema, or one using a keyword the
    /// grammar compiler does not implement, is refused with the compiler's words (which name it).
    pub fn json_schema(schema: Value) -> Result<Self> {
        if !(schema.is_object() || schema.is_boolean()) {
            return Err(HearthError::InvalidRequest(
                "the JSON schema must be an object".into(),
            ));
        }
        let schema = if schema.is_object() {
            let mut schema = compact(schema);
            schema::close_objects(&mut schema);
            schema
        } else {
            schema
        };
        let mut c = Self::checked(TopLevelGrammar::from_json_schema(schema), "json_schema")?;
        c.json = true;
        Ok(c)
    }

    /// Output that matches the regular expression (whole).
    pub fn regex(rx: &str) -> Result<Self> {
        Self::checked(TopLevelGrammar::from_regex(rx), "regex")
    }

    /// Output in the language of a Lark grammar (llguidance's dialect, which also reads GBNF-style
    /// rules).
    pub fn lark(grammar: &str) -> Result<Self> {
        Self::checked(TopLevelGrammar::from_lark(grammar.to_string()), "grammar")
    }

    /// Compile against a vocabulary of single bytes: every error the grammar can have shows here,
    /// without any model's tokenizer.
    fn checked(grammar: TopLevelGrammar, kind: &'static str) -> Result<Self> {
        static BYTES: std::sync::OnceLock<Option<ParserFactory>> = std::sync::OnceLock::new();
        let factory = BYTES
            .get_or_init(|| {
                let env: TokEnv = Arc::new(ApproximateTokEnv::single_byte());
                quiet(ParserFactory::new_simple(&env).ok())
            })
            .as_ref()
            .ok_or_else(|| HearthError::Internal("the grammar compiler did not start".into()))?;
        factory.create_parser(grammar.clone()).map_err(|e| {
            HearthError::InvalidRequest(format!("{kind}: {}", first_line(&e.to_string())))
        })?;
        Ok(Self {
            grammar: Arc::new(grammar),
            kind,
            json: false,
        })
    }
}

fn quiet(mut f: Option<ParserFactory>) -> Option<ParserFactory> {
    if let Some(f) = f.as_mut() {
        f.quiet();
    }
    f
}

/// llguidance errors can run to a dump of the grammar; the first line says what is wrong.
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s).trim()
}

/// A model's vocabulary as llguidance sees it: every token's bytes (special tokens marked, so
/// grammar text never matches them), and the model's tokenizer for text it must tokenize.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        self.tokenizer
            .encode_continuation(&String::from_utf8_lossy(s))
            .unwrap_or_default()
    }
}

/// One model's grammar compiler (built on the first constrained request: the vocabulary's trie
/// takes a moment for a 262k-token vocabulary).
pub struct Compiler {
    factory: ParserFactory,
    eos_ids: Vec<u32>,
    digits: DigitTokens,
}

impl Compiler {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Self> {
        let words = tokenizer.token_bytes()?;
        let eos = tokenizer.eos_ids.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(words.len() as u32, eos);
        let env: TokEnv = Arc::new(Vocabulary {
            trie: TokTrie::from(&info, &words),
            tokenizer: tokenizer.clone(),
        });
        let factory = ParserFactory::new_simple(&env)
            .map_err(|e| HearthError::Internal(format!("grammar compiler: {e}")))?;
        Ok(Self {
            factory: quiet(Some(factory)).expect("just built"),
            eos_ids: tokenizer.eos_ids.clone(),
            digits: DigitTokens::new(env),
        })
    }

    /// A sequence's guide for `constraint` in this model's tokens.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide> {
        let parser = self
            .factory
            .create_parser((*constraint.grammar).clone())
            .map_err(|e| {
                HearthError::InvalidRequest(format!(
                    "{}: {}",
                    constraint.kind,
                    first_line(&e.to_string())
                ))
            })?;
        Ok(Guide {
            matcher: Matcher::new(Ok(parser)),
            eos_ids: self.eos_ids.clone(),
            finished: false,
            ready: None,
            numbers: constraint.json.then(|| NumberCap::new(self.digits.clone())),
        })
    }
}

/// One sequence's place in its grammar: which tokens may come next, and whether it is complete.
pub struct Guide {
    matcher: Matcher,
    eos_ids: Vec<u32>,
    finished: bool,
    /// The next mask, computed ahead (while the step's forward runs).
    ready: Option<llguidance::toktrie::SimpleVob>,
    numbers: Option<NumberCap>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("finished", &self.finished)
            .finish()
    }
}

impl Guide {
    /// Set every token the grammar forbids next to -inf. Where the grammar may end, the model's
    /// end-of-sequence tokens stay allowed; where it must end, only they are.
    /// Compute the next mask now, so `mask` finds it ready.
    pub fn prepare(&mut self) {
        if self.ready.is_none() && !self.finished {
            self.ready = self.matcher.compute_mask_or_eos().ok();
        }
    }

    pub fn mask(&mut self, logits: &mut [f32]) {
        let next = match self.ready.take() {
            Some(m) => Ok(m),
            None => self.matcher.compute_mask_or_eos(),
        };
        let mut allowed = match next {
            Ok(m) => m,
            Err(e) => {
                // A matcher fault (not the model's choice) ends the sequence where it stands.
                tracing::warn!(error = %e, "grammar matcher failed; ending the sequence");
                self.finished = true;
                return;
            }
        };
        if let Some(n) = &self.numbers {
            n.limit(&mut allowed);
        }
        let end_allowed =
            self.matcher.is_stopped() || self.eos_ids.iter().any(|&e| allowed.is_allowed(e));
        let eos: Vec<(usize, f32)> = self
            .eos_ids
            .iter()
            .filter_map(|&e| logits.get(e as usize).map(|&l| (e as usize, l)))
            .collect();
        // Word by word: most words of a mask are all-forbidden or all-allowed.
        let words = allowed.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                0 => chunk.fill(f32::NEG_INFINITY),
                u32::MAX => {}
                bits => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        if bits & (1 << b) == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        for (i, l) in eos {
            logits[i] = if end_allowed { l } else { f32::NEG_INFINITY };
        }
    }

    /// Whether the grammar allows `token` next: a check of one token, far cheaper than a mask
    /// over the vocabulary. When the sampler's own pick passes it, no mask is needed (see
    /// `Sampler::sample`).
    pub fn allows(&mut self, token: u32) -> bool {
        if self.finished {
            return false;
        }
        if self.eos_ids.contains(&token) {
            return self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false);
        }
        if self.numbers.as_ref().is_some_and(|n| n.forbids(token)) {
            return false;
        }
        self.matcher.validate_tokens(&[token]).is_ok_and(|n| n == 1)
    }

    /// Whether a mask was computed ahead (`prepare`) and waits for this step.
    pub fn has_ready_mask(&self) -> bool {
        self.ready.is_some()
    }

    /// Follow the token the sampler picked.
    pub fn commit(&mut self, token: u32) {
        self.ready = None;
        if self.eos_ids.contains(&token) {
            self.finished = true;
            return;
        }
        if let Some(n) = self.numbers.as_mut() {
            n.push(token);
        }
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!(error = %e, token, "grammar refused a sampled token; ending the sequence");
            self.finished = true;
            return;
        }
        if self.matcher.is_stopped() {
            self.finished = true;
        }
    }

    /// The grammar is complete (or failed): the sequence ends here.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}
