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

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/smollm2-tokenizer");
        Tokenizer::from_hf_dir(&dir).unwrap()
    }

    /// Feeds `text`'s tokens one by one; returns the released pieces and whether a stop hit.
    fn run(text: &str, stops: &[&str]) -> (Vec<String>, bool, String) {
        let tok = tokenizer();
        let mut st = TextState::new(stops.iter().map(|s| s.to_string()).collect());
        let mut pieces = vec![];
        for id in tok.encode(text, false).unwrap() {
            let (p, hit) = st.push(&tok, id);
            pieces.push(p);
            if hit {
                return (pieces, true, st.text().to_string());
            }
        }
        pieces.push(st.flush(&tok));
        (pieces, false, st.text().to_string())
    }

    #[test]
    fn chinese_text_comes_out_in_whole_characters() {
        let (pieces, hit, text) = run("你好，世界！今天天气很好。", &[]);
        assert!(!hit);
        assert_eq!(pieces.concat(), "你好，世界！今天天气很好。");
        assert_eq!(text, pieces.concat());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    }

    #[test]
    fn stop_string_is_cut_and_never_sent() {
        let (pieces, hit, text) = run("The answer is 42.\nUSER: next question", &["\nUSER:"]);
        assert!(hit);
        assert_eq!(pieces.concat(), "The answer is 42.");
        assert_eq!(text, "The answer is 42.");
    }

    #[test]
    fn a_partial_stop_string_is_held_back_then_released() {
        let tok = tokenizer();
        let mut st = TextState::new(vec!["###".into()]);
        let mut sent = String::new();
        for id in tok.encode("Total: 5 ## items", false).unwrap() {
            let (p, hit) = st.push(&tok, id);
            assert!(!hit);
            // "#" or "##" at the end might start "###": it must not be out yet.
            if st.text().ends_with('#') {
                assert!(!(sent.clone() + &p).ends_with('#'));
            }
            sent.push_str(&p);
        }
        sent.push_str(&st.flush(&tok));
        assert_eq!(sent, "Total: 5 ## items");
    }
}
