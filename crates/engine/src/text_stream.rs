//! Turning generated ids into text as they come: only whole UTF-8 characters are
//! released, and text that might be the start of a stop string is held back until
//! it is known not to be one.

use crate::tokenizer::{DecodeStream, Tokenizer};

/// The generated text of one sequence and how much of it was sent.
pub struct TextState {
    decoder: DecodeStream,
    text: String,
    sent: usize,
    stops: Vec<String>,
}

impl TextState {
    /// Empty state that stops at `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        TextState {
            decoder: DecodeStream::new(true),
            text: String::new(),
            sent: 0,
            stops,
        }
    }

    /// Adds a token. Returns the text that can be released now, and whether a stop
    /// string was reached (the text then ends just before it).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> (String, bool) {
        if let Ok(Some(delta)) = self.decoder.step(tok, id) {
            self.text.push_str(&delta);
        }
        self.release()
    }

    fn release(&mut self) -> (String, bool) {
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        // A stop string can only newly appear in the unsent tail plus what precedes it.
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(pos) = hit {
            let pos = pos.max(self.sent);
            let out = self.text[self.sent..pos].to_string();
            self.text.truncate(pos);
            self.sent = pos;
            return (out, true);
        }
        let held = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k])))
            .max()
            .unwrap_or(0);
        let end = (self.text.len() - held).max(self.sent);
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        (out, false)
    }

    /// Everything not yet released (at the end of generation).
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        if let Ok(Some(rest)) = self.decoder.finish(tok) {
            self.text.push_str(&rest);
        }
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }

    /// The text generated so far (up to any stop string).
    pub fn text(&self) -> &str {
        &self.text
    }
}
