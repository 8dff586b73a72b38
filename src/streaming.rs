//! Incremental detokenization: text arrives token by token, never as broken UTF-8, and text that may be
//! the start of a stop string is held back until it is known not to be.
use std::sync::Arc;

use crate::error::Result;
use crate::model::Tokenizer;

pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    emitted: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl TextStream {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
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
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        // A trailing U+FFFD means a multi-byte character is still incomplete.
        let complete = text.trim_end_matches('\u{FFFD}');
        Ok(self.release(complete.to_string(), false))
    }

    /// The rest of the text at the end of generation.
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids)?;
        Ok(self.release(text, true))
    }

    fn release(&mut self, text: String, last: bool) -> String {
        if text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            return String::new();
        }
        let mut end = text.len();
        for s in &self.stops {
            if let Some(p) = text[self.emitted..].find(s.as_str()) {
                end = end.min(self.emitted + p);
                self.stopped = true;
            }
        }
        if !self.stopped && !last {
            // Hold back a suffix that could still grow into a stop string.
            for s in &self.stops {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && text[self.emitted..].ends_with(&s[..k]) {
                        end = end.min(text.len() - k);
                        break;
                    }
                }
            }
        }
        let out = text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}
