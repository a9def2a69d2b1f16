//! Results tables from a judgment file, computed as FastChat's
//! `show_result` computes them, plus a per-category breakdown for charts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::error::{EvalError, Result};
use crate::jsonl;
use crate::question::QuestionId;

/// Which rows count.
#[derive(Debug, Clone, Default)]
pub struct ShowOptions {
    /// Only these models (FastChat's `--model-list`; pairwise: filters `model_1`).
    pub model_list: Option<Vec<String>>,
    /// Pairwise: only rows with this model, which is left out of the table
    /// (FastChat's `pairwise-baseline` mode). None: all pairs.
    pub baseline: Option<String>,
    /// Question id → category, for rows that carry no `category`.
    pub categories: BTreeMap<QuestionId, String>,
}

/// A model's mean score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeanScore {
    /// The model.
    pub model: String,
    /// Mean of its ratings.
    pub score: f64,
    /// How many ratings.
    pub count: usize,
}

/// Single-mode results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SingleResults {
    /// Turn 1, best first.
    pub first_turn: Vec<MeanScore>,
    /// Turn 2, best first (empty when no question has two turns).
    pub second_turn: Vec<MeanScore>,
    /// Both turns, best first.
    pub average: Vec<MeanScore>,
    /// Model → category → mean score (both turns).
    pub by_category: BTreeMap<String, BTreeMap<String, f64>>,
    /// Rows left out because no rating could be read (score -1).
    pub unrated: usize,
}

/// One model's pairwise record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairRow {
    /// The model.
    pub model: String,
    /// Wins (both orders agree).
    pub win: u64,
    /// Losses (both orders agree).
    pub loss: u64,
    /// Ties, and disagreements between the two orders.
    pub tie: u64,
    /// win / total.
    pub win_rate: f64,
    /// loss / total.
    pub loss_rate: f64,
    /// (win + tie/2) / total.
    pub win_rate_adjusted: f64,
}

/// Pairwise results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairResults {
    /// Best adjusted win rate first.
    pub rows: Vec<PairRow>,
    /// Model → category → adjusted win rate.
    pub by_category: BTreeMap<String, BTreeMap<String, f64>>,
    /// Rows left out because a verdict could not be read (`error`).
    pub errors: usize,
}

/// The results of either kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Results {
    /// `single`
    Single(SingleResults),
    /// `pairwise`
    Pairwise(PairResults),
}

/// Reads a judgment file and computes its tables (the mode follows from its rows).
pub fn show(path: &Path, opts: &ShowOptions) -> Result<Results> {
    let rows: Vec<(usize, Value)> = jsonl::read(path)?;
    if rows.is_empty() {
        return Err(EvalError::Input(format!("{}: no judgments", path.display())));
    }
    let pairwise = rows[0].1.get("model_1").is_some();
    if pairwise {
        pair_results(path, &rows, opts).map(Results::Pairwise)
    } else {
        single_results(path, &rows, opts).map(Results::Single)
    }
}

fn field<'a>(path: &Path, line: usize, v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name).ok_or_else(|| EvalError::BadLine {
        path: path.to_path_buf(),
        line,
        msg: format!("missing field {name}"),
    })
}

fn str_field<'a>(path: &Path, line: usize, v: &'a Value, name: &str) -> Result<&'a str> {
    field(path, line, v, name)?.as_str().ok_or_else(|| EvalError::BadLine {
        path: path.to_path_buf(),
        line,
        msg: format!("{name} must be a string"),
    })
}

fn category(v: &Value, opts: &ShowOptions) -> Option<String> {
    if let Some(c) = v.get("category").and_then(Value::as_str) {
        return Some(c.to_string());
    }
    let id: QuestionId = serde_json::from_value(v.get("question_id")?.clone()).ok()?;
    opts.categories.get(&id).cloned()
}

fn sorted_means(acc: BTreeMap<String, (f64, usize)>) -> Vec<MeanScore> {
    let mut v: Vec<MeanScore> = acc
        .into_iter()
        .map(|(model, (sum, count))| MeanScore {
            model,
            score: sum / count as f64,
            count,
        })
        .collect();
    v.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.model.cmp(&b.model)));
    v
}

fn single_results(path: &Path, rows: &[(usize, Value)], opts: &ShowOptions) -> Result<SingleResults> {
    let (mut t1, mut t2, mut all) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut cats: BTreeMap<String, BTreeMap<String, (f64, usize)>> = BTreeMap::new();
    let mut unrated = 0;
    for (line, v) in rows {
        let line = *line;
        let model = str_field(path, line, v, "model")?;
        let score = field(path, line, v, "score")?
            .as_f64()
            .ok_or_else(|| EvalError::BadLine {
                path: path.to_path_buf(),
                line,
                msg: "score must be a number".into(),
            })?;
        let turn = field(path, line, v, "turn")?
            .as_i64()
            .ok_or_else(|| EvalError::BadLine {
                path: path.to_path_buf(),
                line,
                msg: "turn must be an integer".into(),
            })?;
        if score == -1.0 {
            unrated += 1;
            continue;
        }
        if opts.model_list.as_ref().is_some_and(|l| !l.iter().any(|m| m == model)) {
            continue;
        }
        let add = |m: &mut BTreeMap<String, (f64, usize)>| {
            let e = m.entry(model.to_string()).or_insert((0.0, 0));
            e.0 += score;
            e.1 += 1;
        };
        match turn {
            1 => add(&mut t1),
            2 => add(&mut t2),
            _ => {}
        }
        add(&mut all);
        if let Some(c) = category(v, opts) {
            let e = cats.entry(model.to_string()).or_default().entry(c).or_insert((0.0, 0));
            e.0 += score;
            e.1 += 1;
        }
    }
    let by_category = cats
        .into_iter()
        .map(|(m, c)| (m, c.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect()))
        .collect();
    Ok(SingleResults {
        first_turn: sorted_means(t1),
        second_turn: sorted_means(t2),
        average: sorted_means(all),
        by_category,
        unrated,
    })
}

#[derive(Default, Clone, Copy)]
struct Wlt {
    win: u64,
    loss: u64,
    tie: u64,
}

impl Wlt {
    fn row(self, model: String) -> PairRow {
        let total = (self.win + self.loss + self.tie) as f64;
        PairRow {
            model,
            win: self.win,
            loss: self.loss,
            tie: self.tie,
            win_rate: self.win as f64 / total,
            loss_rate: self.loss as f64 / total,
            win_rate_adjusted: (self.win as f64 + 0.5 * self.tie as f64) / total,
        }
    }
}

fn pair_results(path: &Path, rows: &[(usize, Value)], opts: &ShowOptions) -> Result<PairResults> {
    let mut totals: BTreeMap<String, Wlt> = BTreeMap::new();
    let mut cats: BTreeMap<String, BTreeMap<String, Wlt>> = BTreeMap::new();
    let mut errors = 0;
    for (line, v) in rows {
        let line = *line;
        let m1 = str_field(path, line, v, "model_1")?;
        let m2 = str_field(path, line, v, "model_2")?;
        let g1 = str_field(path, line, v, "g1_winner")?;
        let g2 = str_field(path, line, v, "g2_winner")?;
        if g1 == "error" || g2 == "error" {
            errors += 1;
            continue;
        }
        if opts.model_list.as_ref().is_some_and(|l| !l.iter().any(|m| m == m1)) {
            continue;
        }
        if let Some(b) = &opts.baseline {
            if b != m1 && b != m2 {
                continue;
            }
        }
        // A win counts only when both orders agree; anything else is a tie.
        let outcome: [(&str, Wlt); 2] = if g1 == "tie" || g1 != g2 {
            let t = Wlt {
                tie: 1,
                ..Wlt::default()
            };
            [(m1, t), (m2, t)]
        } else {
            let (w, l) = if g1 == "model_1" { (m1, m2) } else { (m2, m1) };
            [
                (
                    w,
                    Wlt {
                        win: 1,
                        ..Wlt::default()
                    },
                ),
                (
                    l,
                    Wlt {
                        loss: 1,
                        ..Wlt::default()
                    },
                ),
            ]
        };
        let c = category(v, opts);
        for (m, r) in outcome {
            for acc in [
                Some(totals.entry(m.to_string()).or_default()),
                c.as_ref()
                    .map(|c| cats.entry(m.to_string()).or_default().entry(c.clone()).or_default()),
            ]
            .into_iter()
            .flatten()
            {
                acc.win += r.win;
                acc.loss += r.loss;
                acc.tie += r.tie;
            }
        }
    }
    if let Some(b) = &opts.baseline {
        totals.remove(b);
        cats.remove(b);
    }
    let mut rows: Vec<PairRow> = totals.into_iter().map(|(m, w)| w.row(m)).collect();
    rows.sort_by(|a, b| {
        b.win_rate_adjusted
            .total_cmp(&a.win_rate_adjusted)
            .then_with(|| a.model.cmp(&b.model))
    });
    let by_category = cats
        .into_iter()
        .map(|(m, c)| {
            (
                m,
                c.into_iter()
                    .map(|(k, w)| (k, w.row(String::new()).win_rate_adjusted))
                    .collect(),
            )
        })
        .collect();
    Ok(PairResults {
        rows,
        by_category,
        errors,
    })
}

fn table(out: &mut String, title: &str, rows: &[MeanScore]) {
    let w = rows.iter().map(|r| r.model.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(out, "\n########## {title} ##########");
    let _ = writeln!(out, "{:<w$}  {:>9}  {:>5}", "model", "score", "n");
    for r in rows {
        let _ = writeln!(out, "{:<w$}  {:>9.6}  {:>5}", r.model, r.score, r.count);
    }
}

/// The tables as text, in FastChat's sections.
pub fn render(results: &Results) -> String {
    let mut out = String::new();
    match results {
        Results::Single(s) => {
            let _ = writeln!(out, "Mode: single");
            table(&mut out, "First turn", &s.first_turn);
            if !s.second_turn.is_empty() {
                table(&mut out, "Second turn", &s.second_turn);
                table(&mut out, "Average", &s.average);
            }
            if s.unrated > 0 {
                let _ = writeln!(out, "\n({} judgments without a readable rating left out)", s.unrated);
            }
        }
        Results::Pairwise(p) => {
            let _ = writeln!(out, "Mode: pairwise");
            let w = p.rows.iter().map(|r| r.model.len()).max().unwrap_or(5).max(5);
            let _ = writeln!(
                out,
                "{:<w$}  {:>5}  {:>5}  {:>5}  {:>9}  {:>9}  {:>17}",
                "model", "win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted"
            );
            for r in &p.rows {
                let _ = writeln!(
                    out,
                    "{:<w$}  {:>5}  {:>5}  {:>5}  {:>9.6}  {:>9.6}  {:>17.6}",
                    r.model, r.win, r.loss, r.tie, r.win_rate, r.loss_rate, r.win_rate_adjusted
                );
            }
            if p.errors > 0 {
                let _ = writeln!(out, "\n({} judgments without a readable verdict left out)", p.errors);
            }
        }
    }
    out
}

/// The per-category table as text (models down, categories across).
pub fn render_categories(by_category: &BTreeMap<String, BTreeMap<String, f64>>) -> String {
    let cats = category_names(by_category);
    if cats.is_empty() {
        return String::new();
    }
    let w = by_category.keys().map(String::len).max().unwrap_or(5).max(5);
    let mut out = String::from("\n########## By category ##########\n");
    let _ = write!(out, "{:<w$}", "model");
    for c in &cats {
        let _ = write!(out, "  {:>w2$}", c, w2 = c.len().max(6));
    }
    out.push('\n');
    for (m, per) in by_category {
        let _ = write!(out, "{m:<w$}");
        for c in &cats {
            let w2 = c.len().max(6);
            match per.get(c) {
                Some(v) => {
                    let _ = write!(out, "  {v:>w2$.3}");
                }
                None => {
                    let _ = write!(out, "  {:>w2$}", "-");
                }
            }
        }
        out.push('\n');
    }
    out
}

/// Every category that appears, in order of first appearance in MT-bench's
/// order where known, then alphabetically.
pub fn category_names(by_category: &BTreeMap<String, BTreeMap<String, f64>>) -> Vec<String> {
    const MT_BENCH: [&str; 8] = [
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    ];
    let mut all: Vec<String> = by_category.values().flat_map(|c| c.keys().cloned()).collect();
    all.sort();
    all.dedup();
    all.sort_by_key(|c| MT_BENCH.iter().position(|m| m == c).unwrap_or(MT_BENCH.len()));
    all
}
