//! Constrained decoding: the generated text must be one of a list of strings or
//! match a regular expression. Classification labels and judge verdicts are then
//! always parseable.
//!
//! The language is compiled once (on the caller's thread) into a byte-level DFA
//! anchored at both ends. At each step the vocabulary is run through the DFA from
//! the current state; entries that lead to the dead state are masked out. EOS is
//! allowed only where the text so far is a complete match. Allowed-token lists are
//! cached per DFA state, so a short label set costs a vocabulary scan per distinct
//! state, not per step.
//!
//! Both costs are bounded up front, since patterns come from untrusted requests:
//! the pattern's length, nesting, NFA and DFA sizes are capped (a pattern such as
//! `(a|aa)*b{1,1000}{1,1000}` is refused in milliseconds instead of building
//! gigabytes), and the vocabulary scan walks the tokens in sorted order, so each
//! shared prefix is stepped through once and a dead prefix rules out every token
//! that starts with it.

use std::collections::HashMap;
use std::sync::Arc;

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::nfa::thompson;
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::util::syntax;
use regex_automata::{Anchored, MatchKind};

use crate::error::{EngineError, Result};

/// What the generated text must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A full match of this regular expression (Rust `regex` syntax).
    Regex(String),
    /// JSON that this JSON Schema accepts, in `json.dumps`' layout
    /// (see [`crate::json_schema`] for the keywords supported).
    JsonSchema(serde_json::Value),
    /// Any JSON object (OpenAI's `response_format: json_object`).
    JsonObject,
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
            Constraint::JsonSchema(schema) => crate::json_schema::schema_to_regex(schema)
                .map_err(|e| EngineError::InvalidRequest(format!("JSON schema: {e}"))),
            Constraint::JsonObject => Ok(crate::json_schema::any_object_regex()),
        }
    }

    /// Longest pattern this constraint may compile from: a schema's generated
    /// pattern is longer than a hand-written one for the same automaton size.
    fn max_pattern_bytes(&self) -> usize {
        match self {
            Constraint::JsonSchema(_) | Constraint::JsonObject => MAX_SCHEMA_PATTERN_BYTES,
            _ => MAX_PATTERN_BYTES,
        }
    }

    /// Compiles the constraint; a bad or too costly pattern is an invalid request.
    /// The limits ([`MAX_PATTERN_BYTES`], [`NFA_SIZE_LIMIT`], [`DFA_SIZE_LIMIT`])
    /// bound the time and memory this takes (milliseconds, a few MiB).
    pub fn compile(&self) -> Result<CompiledConstraint> {
        let body = self.pattern()?;
        let shown = shorten(&body);
        let max = self.max_pattern_bytes();
        if body.len() > max {
            return Err(EngineError::InvalidRequest(format!(
                "constraint pattern `{shown}` is {} bytes; at most {max} are allowed",
                body.len()
            )));
        }
        let pattern = format!("(?:{body})$");
        let too_costly = |e: &dyn std::fmt::Display| {
            EngineError::InvalidRequest(format!(
                "constraint pattern `{shown}`: {e} (constraints may nest {NEST_LIMIT} deep and compile to at most {} KiB of NFA and {} KiB of DFA)",
                NFA_SIZE_LIMIT >> 10,
                DFA_SIZE_LIMIT >> 10
            ))
        };
        // All matches, not leftmost-first: with choices "yes" and "yes, sure" the
        // DFA must not stop at the first one.
        let dfa = dense::Builder::new()
            .syntax(syntax::Config::new().nest_limit(NEST_LIMIT))
            .thompson(thompson::Config::new().nfa_size_limit(Some(NFA_SIZE_LIMIT)))
            .configure(
                dense::Config::new()
                    .start_kind(StartKind::Anchored)
                    .match_kind(MatchKind::All)
                    .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                    .determinize_size_limit(Some(DFA_SIZE_LIMIT)),
            )
            .build(&pattern)
            .map_err(|e| too_costly(&e))?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .map_err(|e| too_costly(&e))?;
        Ok(CompiledConstraint {
            dfa: Arc::new(dfa),
            start,
        })
    }
}

/// Longest pattern (or joined choice list) accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 16 << 10;
/// Longest pattern generated from a JSON schema, in bytes.
pub const MAX_SCHEMA_PATTERN_BYTES: usize = 64 << 10;
/// Deepest nesting of groups and repetitions in a pattern.
pub const NEST_LIMIT: u32 = 64;
/// Largest NFA a pattern may compile to, in bytes: `b{1,1000}{1,1000}` stops here
/// after about a millisecond instead of building a million states.
pub const NFA_SIZE_LIMIT: usize = 2 << 20;
/// Largest DFA (and determinizer scratch) a pattern may compile to, in bytes.
pub const DFA_SIZE_LIMIT: usize = 2 << 20;
/// Allowed-token lists one request keeps (one per DFA state it has visited); past
/// this the cache starts over, so a pattern with many states costs scans, not memory.
const MAX_CACHED_STATES: usize = 256;

/// A pattern cut to a length that fits an error message.
fn shorten(p: &str) -> String {
    match p.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &p[..i]),
        None => p.to_string(),
    }
}

/// The vocabulary as the constraint scan needs it: each id's text bytes, and the
/// ids sorted by those bytes with each one's common prefix length with the one
/// before, so a scan steps through a shared prefix once. Built once per model.
pub struct Vocab {
    bytes: Vec<Option<Vec<u8>>>,
    /// Text tokens (non-empty bytes), sorted by their bytes.
    sorted: Vec<u32>,
    /// `lcp[k]`: bytes `sorted[k]` shares with `sorted[k - 1]` (0 for the first).
    lcp: Vec<u32>,
}

impl Vocab {
    /// Indexes each id's text bytes (`None`: a special token, never allowed).
    pub fn new(bytes: Vec<Option<Vec<u8>>>) -> Self {
        let mut sorted: Vec<u32> = (0..bytes.len() as u32)
            .filter(|&id| bytes[id as usize].as_ref().is_some_and(|b| !b.is_empty()))
            .collect();
        let text = |id: u32| bytes[id as usize].as_deref().unwrap_or_default();
        sorted.sort_by(|&a, &b| text(a).cmp(text(b)).then(a.cmp(&b)));
        let lcp = sorted
            .iter()
            .enumerate()
            .map(|(k, &id)| match k {
                0 => 0,
                _ => text(sorted[k - 1])
                    .iter()
                    .zip(text(id))
                    .take_while(|(a, b)| a == b)
                    .count() as u32,
            })
            .collect();
        Vocab { bytes, sorted, lcp }
    }

    /// The text bytes of `id`, if it is a text token.
    pub fn bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }

    /// Ids in the vocabulary.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
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

    /// The tokens allowed next.
    pub fn allowed(&mut self, vocab: &Vocab) -> Arc<Allowed> {
        if let Some(a) = self.cache.get(&self.state) {
            return a.clone();
        }
        let mut tokens = self.scan(vocab);
        tokens.sort_unstable();
        let dfa = &self.compiled.dfa;
        let complete = dfa.is_match_state(dfa.next_eoi_state(self.state));
        let a = Arc::new(Allowed { tokens, complete });
        if self.cache.len() >= MAX_CACHED_STATES {
            self.cache.clear();
        }
        self.cache.insert(self.state, a.clone());
        a
    }

    /// The text tokens that keep a match possible from the current state. Walks
    /// the sorted vocabulary keeping the DFA state after each prefix length of
    /// the previous token: a token only steps through the bytes past its common
    /// prefix with the one before, and once a prefix is dead every following
    /// token that shares it is skipped without a step.
    fn scan(&self, vocab: &Vocab) -> Vec<u32> {
        let dfa = &self.compiled.dfa;
        let mut out = Vec::new();
        // states[d]: the state after the first d bytes of the previous token.
        let mut states: Vec<StateID> = vec![self.state];
        // The previous token died after this many bytes (usize::MAX: it lived).
        let mut dead_at = usize::MAX;
        for (k, &id) in vocab.sorted.iter().enumerate() {
            let bytes = vocab.bytes(id).unwrap_or_default();
            let common = vocab.lcp[k] as usize;
            if common >= dead_at {
                // Shares the dead prefix of the token before.
                continue;
            }
            states.truncate(common + 1);
            dead_at = usize::MAX;
            let mut s = states[common];
            for (d, &b) in bytes.iter().enumerate().skip(common) {
                s = dfa.next_state(s, b);
                if !self.live(s) {
                    dead_at = d + 1;
                    break;
                }
                states.push(s);
            }
            if dead_at == usize::MAX {
                out.push(id);
            }
        }
        out
    }

    /// Moves past a chosen token's bytes.
    pub fn advance(&mut self, bytes: &[u8]) {
        self.state = self.walk(self.state, bytes);
    }

    /// Whether the text so far matches and nothing more can follow it.
    pub fn finished(&mut self, vocab: &Vocab) -> bool {
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

    fn vocab(words: &[&str]) -> Vocab {
        Vocab::new(words.iter().map(|w| Some(w.as_bytes().to_vec())).collect())
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

    #[test]
    fn pathological_patterns_are_refused_fast_and_name_the_limit() {
        for p in [
            "(a|aa)*b{1,1000}{1,1000}",
            "(((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((a)))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))",
            "[a-z]{1,100}[0-9]{1,100}[a-z]{1,100}x{1,1000}",
        ] {
            let t0 = std::time::Instant::now();
            let e = Constraint::Regex(p.into()).compile().unwrap_err();
            let took = t0.elapsed();
            // Bounded, not seconds: this runs beside the crate's other tests on a
            // shared machine; the 100 ms a user sees is checked at the server
            // (serve's fairness test), where the request runs alone.
            assert!(took < std::time::Duration::from_secs(1), "{p}: {took:?}");
            let m = e.to_string();
            assert!(m.contains("invalid request") && m.contains("constraint pattern"), "{m}");
        }
        let long = "a".repeat(MAX_PATTERN_BYTES + 1);
        let m = Constraint::Regex(long).compile().unwrap_err().to_string();
        assert!(m.contains(&format!("at most {MAX_PATTERN_BYTES}")), "{m}");
    }

    #[test]
    fn the_sorted_scan_allows_exactly_what_a_token_by_token_walk_allows() {
        // Tokens sharing prefixes, in no order, with a special token and an empty one.
        let words = [
            "ab", "abc", "a", "b", "abd", "ba", "abcd", "c", "aab", "aa", "abx", "bb", "", "ac", "abc ",
        ];
        let mut bytes: Vec<Option<Vec<u8>>> = words.iter().map(|w| Some(w.as_bytes().to_vec())).collect();
        bytes.push(None);
        let v = Vocab::new(bytes.clone());
        for re in ["ab(c|d)*", "a+b?", "(ab|ba)+c?", "[ab]{2}c", "b+a"] {
            let c = Constraint::Regex(re.into()).compile().unwrap();
            let mut st = ConstraintState::new(c);
            for prefix in ["", "a", "ab", "b"] {
                st.state = st.compiled.start;
                st.advance(prefix.as_bytes());
                let want: Vec<u32> = bytes
                    .iter()
                    .enumerate()
                    .filter_map(|(id, b)| {
                        let b = b.as_deref().filter(|b| !b.is_empty())?;
                        st.live(st.walk(st.state, b)).then_some(id as u32)
                    })
                    .collect();
                assert_eq!(st.allowed(&v).tokens, want, "{re} after {prefix:?}");
            }
        }
    }
}
