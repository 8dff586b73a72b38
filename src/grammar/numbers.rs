//! A cap on the digits of a JSON number. The JSON grammar lets a number's integral, fractional and
//! exponent parts run on without end, and a small model can keep writing `-3.6999999...` until
//! `max_tokens` (Gemma 3 270M did, on 11 of 126 schemas). After `MAX_DIGITS` digits in a row outside
//! a string, tokens that would add more are masked, so the number ends (llama.cpp's JSON grammar
//! caps the parts at 16 digits too). Digits inside strings are text and are left alone.
use std::sync::Arc;

use llguidance::toktrie::{SimpleVob, TokEnv};

/// Digits in one run (15-17 significant digits is all an f64 holds).
pub const MAX_DIGITS: usize = 16;

/// What the cap needs of a vocabulary: every token's bytes, and the tokens that start with a digit.
#[derive(Clone)]
pub struct DigitTokens {
    env: TokEnv,
    leading_digit: Arc<SimpleVob>,
}

impl DigitTokens {
    pub fn new(env: TokEnv) -> Self {
        let trie = env.tok_trie();
        let mut leading_digit = SimpleVob::alloc(trie.vocab_size());
        for id in 0..trie.vocab_size() as u32 {
            if trie.token(id).first().is_some_and(u8::is_ascii_digit) {
                leading_digit.allow_token(id);
            }
        }
        Self {
            env,
            leading_digit: Arc::new(leading_digit),
        }
    }
}

/// Where one sequence's JSON text stands: inside a string or not, and the digits just written.
pub struct NumberCap {
    tokens: DigitTokens,
    in_string: bool,
    escaped: bool,
    run: usize,
}

impl NumberCap {
    pub fn new(tokens: DigitTokens) -> Self {
        Self {
            tokens,
            in_string: false,
            escaped: false,
            run: 0,
        }
    }

    /// Follow a token's bytes.
    pub fn push(&mut self, token: u32) {
        let trie = self.tokens.env.tok_trie();
        for &b in trie.token(token) {
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            if b.is_ascii_digit() {
                self.run += 1;
            } else {
                self.run = 0;
                self.in_string = b == b'"';
            }
        }
    }

    /// Whether the cap forbids `token` now (ignoring whether the grammar would allow anything
    /// else; `limit` looks at that).
    pub fn forbids(&self, token: u32) -> bool {
        !self.in_string && self.run >= MAX_DIGITS && self.tokens.leading_digit.is_allowed(token)
    }

    /// Forbid another digit once a number's part has `MAX_DIGITS`, where the grammar allows
    /// something else (a pattern that needs the digits keeps them).
    pub fn limit(&self, allowed: &mut SimpleVob) {
        if self.in_string || self.run < MAX_DIGITS {
            return;
        }
        let mut capped = allowed.clone();
        capped.sub(&self.tokens.leading_digit);
        if !capped.is_zero() {
            *allowed = capped;
        }
    }
}
