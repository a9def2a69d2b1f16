//! Constrained decoding: the generated text must be one of a list of strings or
//! match a regular expression. Classification labels and judge verdicts are then
//! always parseable.
//!
//! The language is compiled once (on the caller's thread) into a byte-level DFA
//! anchored at both ends. At each step every vocabulary entry is run through the
//! DFA from the current state; entries that lead to the dead state are masked out.
//! EOS is allowed only where the text so far is a complete match. Allowed-token
//! lists are cached per DFA state, so a short label set costs a vocabulary scan
//! per distinct state, not per step.

use std::collections::HashMap;
use std::sync::Arc;

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

use crate::error::{EngineError, Result};

/// What the generated text must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A full match of this regular expression (Rust `regex` syntax).
    Regex(String),
}

impl Constraint {
    /// The constraint as one regular expression.
    fn pattern(&self) -> Result<String> {
        match self {
            Constraint::Choice(choices) => {
                if choices.is_empty() {
                    return Err(EngineError::InvalidRequest("the choice list is empty".into()));
                }
                if choices.iter().any(|c| c.is_empty()) {
                    return Err(EngineError::InvalidRequest("a choice is the empty string".into()));
                }
                let alts: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                Ok(alts.join("|"))
            }
            Constraint::Regex(re) => Ok(re.clone()),
        }
    }

    /// Compiles the constraint; a bad pattern is an invalid request.
    pub fn compile(&self) -> Result<CompiledConstraint> {
        let pattern = format!("(?:{})$", self.pattern()?);
        // All matches, not leftmost-first: with choices "yes" and "yes, sure" the
        // DFA must not stop at the first one.
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .start_kind(StartKind::Anchored)
                    .match_kind(MatchKind::All)
                    .dfa_size_limit(Some(64 << 20))
                    .determinize_size_limit(Some(64 << 20)),
            )
            .build(&pattern)
            .map_err(|e| EngineError::InvalidRequest(format!("constraint pattern `{pattern}`: {e}")))?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .map_err(|e| EngineError::InvalidRequest(format!("constraint pattern `{pattern}`: {e}")))?;
        Ok(CompiledConstraint {
            dfa: Arc::new(dfa),
            start,
        })
    }
}

/// A compiled constraint, shareable between requests.
#[derive(Clone, Debug)]
pub struct CompiledConstraint {
    dfa: Arc<dense::DFA<Vec<u32>>>,
    start: StateID,
}

/// What the next token may be at one point of a constrained generation.
pub struct Allowed {
    /// Text tokens that keep a match possible.
    pub tokens: Vec<u32>,
    /// Whether the text so far is a complete match (so EOS may end it).
    pub complete: bool,
}

/// One request's position in its constraint.
pub struct ConstraintState {
    compiled: CompiledConstraint,
    state: StateID,
    cache: HashMap<StateID, Arc<Allowed>>,
}

impl ConstraintState {
    pub fn new(compiled: CompiledConstraint) -> Self {
        ConstraintState {
            state: compiled.start,
            compiled,
            cache: HashMap::new(),
        }
    }

    fn walk(&self, mut s: StateID, bytes: &[u8]) -> StateID {
        let dfa = &self.compiled.dfa;
        for &b in bytes {
            s = dfa.next_state(s, b);
            if dfa.is_dead_state(s) || dfa.is_quit_state(s) {
                break;
            }
        }
        s
    }

    fn live(&self, s: StateID) -> bool {
        let dfa = &self.compiled.dfa;
        !dfa.is_dead_state(s) && !dfa.is_quit_state(s)
    }

    /// The tokens allowed next, given each id's text bytes (`None`: special token).
    pub fn allowed(&mut self, vocab: &[Option<Vec<u8>>]) -> Arc<Allowed> {
        if let Some(a) = self.cache.get(&self.state) {
            return a.clone();
        }
        let tokens = vocab
            .iter()
            .enumerate()
            .filter_map(|(id, bytes)| {
                let bytes = bytes.as_deref().filter(|b| !b.is_empty())?;
                self.live(self.walk(self.state, bytes)).then_some(id as u32)
            })
            .collect();
        let dfa = &self.compiled.dfa;
        let complete = dfa.is_match_state(dfa.next_eoi_state(self.state));
        let a = Arc::new(Allowed { tokens, complete });
        self.cache.insert(self.state, a.clone());
        a
    }

    /// Moves past a chosen token's bytes.
    pub fn advance(&mut self, bytes: &[u8]) {
        self.state = self.walk(self.state, bytes);
    }

    /// Whether the text so far matches and nothing more can follow it.
    pub fn finished(&mut self, vocab: &[Option<Vec<u8>>]) -> bool {
        let a = self.allowed(vocab);
        a.complete && a.tokens.is_empty()
    }
}

/// Keeps only the allowed entries of `logits` (EOS ids only where the match is
/// complete). Returns false when nothing is allowed.
pub fn mask_logits(logits: &mut [f32], allowed: &Allowed, eos: &[u32]) -> bool {
    // The allowed set is usually a handful of ids: keep those, not a vocabulary-sized copy.
    let kept: Vec<(usize, f32)> = allowed
        .tokens
        .iter()
        .chain(eos.iter().filter(|_| allowed.complete))
        .filter_map(|&id| logits.get(id as usize).map(|&l| (id as usize, l)))
        .collect();
    logits.fill(f32::NEG_INFINITY);
    for &(id, l) in &kept {
        logits[id] = l;
    }
    !kept.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(words: &[&str]) -> Vec<Option<Vec<u8>>> {
        words.iter().map(|w| Some(w.as_bytes().to_vec())).collect()
    }

    #[test]
    fn choices_allow_only_their_prefixes() {
        let v = vocab(&["pos", "itive", "neg", "ative", "positive", "x", " pos"]);
        let c = Constraint::Choice(vec!["positive".into(), "negative".into()])
            .compile()
            .unwrap();
        let mut st = ConstraintState::new(c);
        let a = st.allowed(&v);
        assert_eq!(a.tokens, vec![0, 2, 4]);
        assert!(!a.complete);
        st.advance(b"pos");
        let a = st.allowed(&v);
        assert_eq!(a.tokens, vec![1]);
        st.advance(b"itive");
        assert!(st.finished(&v));
    }

    #[test]
    fn a_choice_that_prefixes_another_may_end_or_go_on() {
        let v = vocab(&["yes", ",", " sure"]);
        let c = Constraint::Choice(vec!["yes".into(), "yes, sure".into()])
            .compile()
            .unwrap();
        let mut st = ConstraintState::new(c);
        st.advance(b"yes");
        let a = st.allowed(&v);
        assert!(a.complete);
        assert_eq!(a.tokens, vec![1]);
    }

    #[test]
    fn regex_constraint_and_eos_masking() {
        let v = vocab(&["1", "0", "]]", "a"]);
        let c = Constraint::Regex("(10|[1-9])\\]\\]".into()).compile().unwrap();
        let mut st = ConstraintState::new(c);
        let mut logits = vec![0.0, 5.0, 1.0, 9.0, 2.0];
        let a = st.allowed(&v);
        assert!(mask_logits(&mut logits, &a, &[4]));
        assert_eq!(logits[0], 0.0);
        assert_eq!(logits[1], f32::NEG_INFINITY, "'0' cannot start a rating");
        assert_eq!(logits[4], f32::NEG_INFINITY, "EOS before a complete match");
        st.advance(b"1");
        st.advance(b"]]");
        assert!(st.finished(&v));
    }

    #[test]
    fn bad_patterns_are_invalid_requests() {
        let e = Constraint::Regex("(unclosed".into()).compile().unwrap_err();
        assert!(e.to_string().contains("constraint pattern"), "{e}");
        assert!(Constraint::Choice(vec![]).compile().is_err());
    }
}
