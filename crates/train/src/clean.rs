//! `data clean`, `filter`, `split` and friends: whole-dataset transformations, each
//! reporting what it did (per-reason counts) so nothing disappears silently.

use std::collections::{BTreeMap, HashSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use regex::Regex;
use sha2::{Digest, Sha256};

use crate::data::{Role, Sample, Turn};
use crate::error::{Result, TrainError};

/// How many samples each step kept, changed or dropped, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub input: usize,
    pub kept: usize,
    /// Reason → samples dropped for it.
    pub dropped: BTreeMap<&'static str, usize>,
    /// What → how many (e.g. turns converted from HTML).
    pub changed: BTreeMap<&'static str, usize>,
}

impl Report {
    fn drop(&mut self, reason: &'static str) {
        *self.dropped.entry(reason).or_default() += 1;
    }
    fn change(&mut self, what: &'static str) {
        *self.changed.entry(what).or_default() += 1;
    }
}

/// Settings of `data clean`.
#[derive(Debug, Clone)]
pub struct CleanOptions {
    /// Conversations with fewer characters than this (all turns together) are dropped.
    pub min_chars: usize,
    /// Conversations with fewer turns than this are dropped.
    pub min_turns: usize,
    /// Convert turns that contain HTML to markdown.
    pub html_to_markdown: bool,
}

impl Default for CleanOptions {
    fn default() -> Self {
        CleanOptions {
            min_chars: 16,
            min_turns: 2,
            html_to_markdown: true,
        }
    }
}

fn html_re() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"(?i)<(div|p|pre|code|ol|ul|li|br|span|table|tr|td|th|h[1-6]|strong|em|b|i|a|blockquote)(\s[^>]*)?/?>",
        )
        .unwrap_or_else(|e| unreachable!("constant regex: {e}"))
    })
}

/// Whether a turn looks like HTML (the raw ShareGPT export's answers are).
pub fn looks_like_html(text: &str) -> bool {
    html_re().is_match(text)
}

/// HTML → markdown, and the "Copy code" button text ShareGPT exports left in code blocks.
pub fn html_to_markdown(text: &str) -> String {
    let md = htmd::convert(text).unwrap_or_else(|_| text.to_string());
    let copy = ["Copy code", "Copy to clipboard", "Copy"];
    let lines: Vec<&str> = md.lines().filter(|l| !copy.contains(&l.trim())).collect();
    lines.join("\n").trim().to_string()
}

/// The roles of a conversation after dropping a leading assistant turn (as
/// FastChat does: the export sometimes starts mid-exchange), or why it is unusable.
fn fix_roles(turns: &mut Vec<Turn>) -> std::result::Result<(), &'static str> {
    let mut roles = Vec::with_capacity(turns.len());
    for t in turns.iter() {
        roles.push(Role::of(&t.from).ok_or("unknown_role")?);
    }
    let sys = usize::from(roles.first() == Some(&Role::System));
    if roles.get(sys) == Some(&Role::Assistant) {
        turns.remove(sys);
        roles.remove(sys);
    }
    for (i, r) in roles.iter().enumerate().skip(sys) {
        let want = if (i - sys) % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if *r != want {
            return Err("wrong_role_order");
        }
    }
    Ok(())
}

/// Cleans a dataset: HTML → markdown, then drops conversations that are empty,
/// too short, out of role order, or duplicates of an earlier one.
pub fn clean(samples: Vec<Sample>, opts: &CleanOptions) -> (Vec<Sample>, Report) {
    let mut report = Report {
        input: samples.len(),
        ..Default::default()
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(samples.len());
    for mut s in samples {
        if opts.html_to_markdown {
            let mut converted = false;
            for t in &mut s.conversations {
                if looks_like_html(&t.value) {
                    t.value = html_to_markdown(&t.value);
                    converted = true;
                }
            }
            if converted {
                report.change("converted_html");
            }
        }
        for t in &mut s.conversations {
            let trimmed = t.value.trim();
            if trimmed.len() != t.value.len() {
                t.value = trimmed.to_string();
            }
        }
        if s.conversations.is_empty() {
            report.drop("empty");
            continue;
        }
        if s.conversations.iter().any(|t| t.value.is_empty()) {
            report.drop("empty_turn");
            continue;
        }
        if let Err(reason) = fix_roles(&mut s.conversations) {
            report.drop(reason);
            continue;
        }
        let chars: usize = s.conversations.iter().map(|t| t.value.chars().count()).sum();
        if s.conversations.len() < opts.min_turns || chars < opts.min_chars {
            report.drop("too_short");
            continue;
        }
        let mut h = Sha256::new();
        for t in &s.conversations {
            h.update(t.value.as_bytes());
            h.update([0u8]);
        }
        if !seen.insert(h.finalize()) {
            report.drop("duplicate");
            continue;
        }
        out.push(s);
    }
    report.kept = out.len();
    (out, report)
}

/// ISO 639-3 code for the two-letter codes people usually type.
pub fn lang_code(code: &str) -> Result<whatlang::Lang> {
    let three = match code {
        "en" => "eng",
        "zh" => "cmn",
        "ja" => "jpn",
        "ko" => "kor",
        "es" => "spa",
        "fr" => "fra",
        "de" => "deu",
        "ru" => "rus",
        "pt" => "por",
        "it" => "ita",
        "ar" => "arb",
        "vi" => "vie",
        other => other,
    };
    whatlang::Lang::from_code(three).ok_or_else(|| {
        TrainError::setting(
            "--lang",
            format!("unknown language code {code:?}; use ISO 639-1 (en, zh) or 639-3 (eng, cmn)"),
        )
    })
}

/// The language of a conversation (detected on its first few thousand characters).
pub fn detect_lang(s: &Sample) -> Option<whatlang::Lang> {
    let mut text = String::new();
    for t in &s.conversations {
        text.push_str(&t.value);
        text.push('\n');
        if text.len() > 4000 {
            break;
        }
    }
    whatlang::detect(&text).map(|i| i.lang())
}

/// Settings of `data filter`.
#[derive(Debug, Clone, Default)]
pub struct FilterOptions {
    /// Keep only these languages (empty: any).
    pub keep_lang: Vec<whatlang::Lang>,
    /// Drop these languages.
    pub skip_lang: Vec<whatlang::Lang>,
    /// Keep only conversations with a turn matching this.
    pub keep_regex: Option<Regex>,
    /// Drop conversations with a turn matching this.
    pub skip_regex: Option<Regex>,
}

/// Keeps the conversations that pass every filter.
pub fn filter(samples: Vec<Sample>, opts: &FilterOptions) -> (Vec<Sample>, Report) {
    let mut report = Report {
        input: samples.len(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for s in samples {
        if !opts.keep_lang.is_empty() || !opts.skip_lang.is_empty() {
            let lang = detect_lang(&s);
            if !opts.keep_lang.is_empty() && !lang.is_some_and(|l| opts.keep_lang.contains(&l)) {
                report.drop("language_not_kept");
                continue;
            }
            if lang.is_some_and(|l| opts.skip_lang.contains(&l)) {
                report.drop("language_skipped");
                continue;
            }
        }
        let any = |re: &Regex| s.conversations.iter().any(|t| re.is_match(&t.value));
        if opts.keep_regex.as_ref().is_some_and(|re| !any(re)) {
            report.drop("regex_not_matched");
            continue;
        }
        if opts.skip_regex.as_ref().is_some_and(any) {
            report.drop("regex_skipped");
            continue;
        }
        out.push(s);
    }
    report.kept = out.len();
    (out, report)
}

/// Cuts conversations longer than `max_tokens` at turn boundaries (a user turn
/// and its answer stay together), as FastChat's `split_long_conversation`.
/// `count` gives the token count of one turn's text; `overhead` tokens are added
/// per turn for the template's role names and separators.
pub fn split_long(
    samples: Vec<Sample>,
    max_tokens: usize,
    overhead: usize,
    count: &mut dyn FnMut(&str) -> Result<usize>,
) -> Result<(Vec<Sample>, Report)> {
    let mut report = Report {
        input: samples.len(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for s in samples {
        let turns = &s.conversations;
        let mut lens = Vec::with_capacity(turns.len());
        for t in turns {
            lens.push(count(&t.value)? + overhead);
        }
        let mut pieces: Vec<Vec<Turn>> = Vec::new();
        let mut cur: Vec<Turn> = Vec::new();
        let mut cur_len = 0;
        let mut i = 0;
        while i < turns.len() {
            // A system turn, or a user turn with its answer, moves as one unit.
            let unit = if Role::of(&turns[i].from) == Some(Role::User) && i + 1 < turns.len() {
                2
            } else {
                1
            };
            let unit_len: usize = lens[i..i + unit].iter().sum();
            if cur_len + unit_len > max_tokens && !cur.is_empty() {
                pieces.push(std::mem::take(&mut cur));
                cur_len = 0;
            }
            cur.extend_from_slice(&turns[i..i + unit]);
            cur_len += unit_len;
            i += unit;
        }
        if !cur.is_empty() {
            pieces.push(cur);
        }
        if pieces.len() > 1 {
            report.change("conversations_split");
        }
        let n = pieces.len();
        for (k, conversations) in pieces.into_iter().enumerate() {
            let id = if n == 1 { s.id.clone() } else { format!("{}_{k}", s.id) };
            out.push(Sample { id, conversations });
        }
    }
    report.kept = out.len();
    Ok((out, report))
}

/// A seeded shuffle: the same seed gives the same order on every machine.
pub fn shuffled<T>(mut items: Vec<T>, seed: u64) -> Vec<T> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    items.shuffle(&mut rng);
    items
}

/// `n` samples drawn without replacement, in their original order.
pub fn sample(samples: Vec<Sample>, n: usize, seed: u64) -> Vec<Sample> {
    let idx: Vec<usize> = shuffled((0..samples.len()).collect(), seed);
    let mut pick: Vec<usize> = idx.into_iter().take(n).collect();
    pick.sort_unstable();
    let mut keep = vec![false; samples.len()];
    for i in pick {
        keep[i] = true;
    }
    samples
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(s, _)| s)
        .collect()
}

/// A seeded split into (train, test); the test part holds `ratio` of the samples
/// (at least one when there are two or more).
pub fn train_test_split(samples: Vec<Sample>, ratio: f64, seed: u64) -> Result<(Vec<Sample>, Vec<Sample>)> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(TrainError::setting(
            "--test-ratio",
            format!("must be in [0, 1), got {ratio}"),
        ));
    }
    let n = samples.len();
    let mut n_test = (n as f64 * ratio).round() as usize;
    if ratio > 0.0 && n >= 2 {
        n_test = n_test.clamp(1, n - 1);
    }
    let order = shuffled((0..n).collect::<Vec<_>>(), seed);
    let mut is_test = vec![false; n];
    for &i in order.iter().take(n_test) {
        is_test[i] = true;
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (s, t) in samples.into_iter().zip(is_test) {
        if t {
            test.push(s)
        } else {
            train.push(s)
        }
    }
    Ok((train, test))
}
