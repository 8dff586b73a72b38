//! Incremental detokenization: text arrives token by token, never as broken UTF-8, and text that may
//! be the start of a stop string is held back until it is known not to be. Each token costs a decode
//! of a short window of recent ids (the `tokenizers` crate's stream decoding), not of the whole output.
use std::sync::Arc;

use super::tokenizer::DecodeState;
use super::Tokenizer;
use crate::error::Result;

pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    state: DecodeState,
    /// Decoded text not yet handed out (held back for stop strings).
    pending: String,
    stops: Arc<[String]>,
    stopped: bool,
}

impl TextStream {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Arc<[String]>) -> Self {
        Self {
            tokenizer,
            state: DecodeState::default(),
            pending: String::new(),
            stops,
            stopped: false,
        }
    }

    /// Whether a stop string has been seen; nothing more will be emitted.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Add a token; returns the text that is now safe to show.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        if let Some(piece) = self.tokenizer.decode_step(id, &mut self.state)? {
            self.pending.push_str(&piece);
        }
        Ok(self.release(false))
    }

    /// The rest of the text at the end of generation (an incomplete last character included, as
    /// U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        if !self.state.undecoded().is_empty() {
            let text = self.tokenizer.decode(self.state.ids())?;
            if let Some(rest) = text.strip_prefix(self.state.prefix()) {
                self.pending.push_str(rest);
            }
        }
        Ok(self.release(true))
    }

    fn release(&mut self, last: bool) -> String {
        let mut end = self.pending.len();
        for s in self.stops.iter().filter(|s| !s.is_empty()) {
            if let Some(p) = self.pending.find(s.as_str()) {
                end = end.min(p);
                self.stopped = true;
            }
        }
        if !self.stopped && !last {
            // Hold back a suffix that could still grow into a stop string.
            for s in self.stops.iter() {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.pending.ends_with(&s[..k]) {
                        end = end.min(self.pending.len() - k);
                        break;
                    }
                }
            }
        }
        let out: String = self.pending.drain(..end).collect();
        if self.stopped {
            self.pending.clear();
        }
        out
    }
}
