//! Reading a label out of free text (an external API's answer, where no
//! constraint applies). The order follows FastChat's and CARP's parsers: the
//! answer line (`LABEL: x`), then the last line, its last sentence, its last
//! comma-separated chunk, then the whole answer; at each step exactly one label
//! must be named, otherwise the next step is tried.

use super::labels::LabelSet;

/// The label named in `answer`, or `None` when no step finds exactly one.
pub fn parse_label(answer: &str, labels: &LabelSet, markers: &[&str]) -> Option<usize> {
    let answer = answer.trim();
    // 1. The text after the last answer marker, up to the end of its line.
    let lower = answer.to_lowercase();
    let mut best: Option<usize> = None;
    for m in markers {
        if let Some(pos) = lower.rfind(&m.to_lowercase()) {
            let after = pos + m.to_lowercase().len();
            if best.is_none_or(|b| after > b) {
                best = Some(after);
            }
        }
    }
    if let Some(start) = best {
        // `to_lowercase` can change byte lengths; fall back to the original when it did.
        let tail = if lower.len() == answer.len() {
            &answer[start..]
        } else {
            &lower[start..]
        };
        let line = tail.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if let Some(i) = only_one(line, labels) {
            return Some(i);
        }
    }
    // 2. The last line, its last sentence, its last comma chunk.
    let last_line = answer.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let last_sentence = last_line
        .split_inclusive(['.', '!', '?', '。', '！', '？'])
        .rev()
        .find(|s| s.trim().chars().any(char::is_alphanumeric))
        .unwrap_or(last_line);
    let last_chunk = last_sentence
        .split([',', '，', ';', '；'])
        .rev()
        .find(|s| !s.trim().is_empty())
        .unwrap_or(last_sentence);
    for part in [last_line, last_sentence, last_chunk, answer] {
        if let Some(i) = only_one(part, labels) {
            return Some(i);
        }
    }
    None
}

/// The one label `text` names, if exactly one is named.
fn only_one(text: &str, labels: &LabelSet) -> Option<usize> {
    let found = mentioned(text, labels);
    match found.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Labels named in `text`, ignoring case; an ASCII label must stand as a whole
/// word, and a label found only inside a longer label's mention does not count.
pub fn mentioned(text: &str, labels: &LabelSet) -> Vec<usize> {
    let hay = text.to_lowercase();
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    for (i, l) in labels.labels.iter().enumerate() {
        let needle = l.name.to_lowercase();
        if needle.is_empty() {
            continue;
        }
        let mut from = 0;
        while let Some(p) = hay[from..].find(&needle) {
            let (s, e) = (from + p, from + p + needle.len());
            let before = hay[..s].chars().next_back();
            let after = hay[e..].chars().next();
            let word_char = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let ascii_edges = needle.starts_with(|c: char| c.is_ascii_alphanumeric())
                && needle.ends_with(|c: char| c.is_ascii_alphanumeric());
            if !ascii_edges || (!word_char(before) && !word_char(after)) {
                spans.push((s, e, i));
            }
            from = s + needle.chars().next().map_or(1, char::len_utf8);
        }
    }
    let mut out: Vec<usize> = Vec::new();
    for &(s, e, i) in &spans {
        let inside_longer = spans
            .iter()
            .any(|&(s2, e2, j)| j != i && s2 <= s && e <= e2 && (e2 - s2) > (e - s));
        if !inside_longer && !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(list: &str) -> LabelSet {
        LabelSet::from_list(list).unwrap()
    }

    #[test]
    fn answer_line_wins_over_earlier_mentions() {
        let l = set("positive,negative");
        let a = "CLUES: not bad, fun\nREASONING: the negative words are negated, so it is positive.\nLABEL: Positive";
        assert_eq!(parse_label(a, &l, &["LABEL:"]), Some(0));
    }

    #[test]
    fn last_sentence_then_whole_answer() {
        let l = set("sport,business,tech");
        assert_eq!(
            parse_label("It mentions markets and sport. So: business.", &l, &["LABEL:"]),
            Some(1)
        );
        assert_eq!(parse_label("Clearly about sport", &l, &["LABEL:"]), Some(0));
        assert_eq!(parse_label("sport or business, hard to say", &l, &["LABEL:"]), None);
        assert_eq!(parse_label("no idea", &l, &["LABEL:"]), None);
    }

    #[test]
    fn whole_words_and_longest_label() {
        let l = set("positive,very positive");
        assert_eq!(mentioned("very positive indeed", &l), vec![1]);
        let l = set("art,tech");
        assert_eq!(mentioned("a smart technique", &l), Vec::<usize>::new());
    }

    #[test]
    fn chinese_labels() {
        let l = set("正面,负面");
        assert_eq!(
            parse_label("线索：好吃\n推理：评价很好。\n标签：正面", &l, &["标签："]),
            Some(0)
        );
        assert_eq!(parse_label("这条评论是负面的。", &l, &["标签："]), Some(1));
    }
}
