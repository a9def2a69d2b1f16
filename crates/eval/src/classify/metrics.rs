//! Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.
//!
//! A prediction of `None` (an answer that could not be parsed) counts against
//! recall and accuracy and is shown in its own confusion-matrix column.

use serde::Serialize;

/// Scores of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScores {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold examples of this class.
    pub support: usize,
}

/// Every score of a labelled run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Examples with a gold label.
    pub n: usize,
    pub accuracy: f64,
    /// Unweighted mean of the per-class F1 (a class never predicted scores 0).
    pub macro_f1: f64,
    pub per_class: Vec<ClassScores>,
    /// `confusion[gold][predicted]`; the last column counts unparsed answers.
    pub confusion: Vec<Vec<usize>>,
    pub parse_failures: usize,
    pub parse_failure_rate: f64,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl Metrics {
    /// Scores from `(gold, predicted)` pairs over `labels`.
    pub fn compute(labels: &[String], pairs: &[(usize, Option<usize>)]) -> Metrics {
        let k = labels.len();
        let mut confusion = vec![vec![0usize; k + 1]; k];
        for &(g, p) in pairs {
            confusion[g][p.unwrap_or(k)] += 1;
        }
        let per_class: Vec<ClassScores> = (0..k)
            .map(|c| {
                let tp = confusion[c][c];
                let predicted: usize = (0..k).map(|g| confusion[g][c]).sum();
                let support: usize = confusion[c].iter().sum();
                let precision = ratio(tp, predicted);
                let recall = ratio(tp, support);
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                ClassScores {
                    label: labels[c].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let correct = (0..k).map(|c| confusion[c][c]).sum();
        let parse_failures = pairs.iter().filter(|(_, p)| p.is_none()).count();
        Metrics {
            n: pairs.len(),
            accuracy: ratio(correct, pairs.len()),
            macro_f1: if k == 0 {
                0.0
            } else {
                per_class.iter().map(|c| c.f1).sum::<f64>() / k as f64
            },
            per_class,
            confusion,
            parse_failures,
            parse_failure_rate: ratio(parse_failures, pairs.len()),
        }
    }

    /// The scores and the confusion matrix as aligned text tables.
    pub fn table(&self) -> String {
        let labels: Vec<&str> = self.per_class.iter().map(|c| c.label.as_str()).collect();
        let w = labels.iter().map(|l| l.chars().count()).max().unwrap_or(5).max(9);
        let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
        let mut s = format!(
            "n = {}  accuracy = {:.4}  macro-F1 = {:.4}  parse failures = {} ({:.2}%)\n\n",
            self.n,
            self.accuracy,
            self.macro_f1,
            self.parse_failures,
            100.0 * self.parse_failure_rate
        );
        s.push_str(&format!("{}  precision  recall     F1  support\n", pad("class", w)));
        for c in &self.per_class {
            s.push_str(&format!(
                "{}  {:>9.4}  {:>6.4}  {:>5.4}  {:>7}\n",
                pad(&c.label, w),
                c.precision,
                c.recall,
                c.f1,
                c.support
            ));
        }
        s.push_str("\nconfusion matrix (rows: gold, columns: predicted)\n");
        let show_none = self.parse_failures > 0;
        let cw = labels.iter().map(|l| l.chars().count()).max().unwrap_or(4).max(6);
        s.push_str(&pad("", w));
        for l in &labels {
            s.push_str(&format!("  {:>cw$}", l));
        }
        if show_none {
            s.push_str(&format!("  {:>cw$}", "(none)"));
        }
        s.push('\n');
        for (g, row) in self.confusion.iter().enumerate() {
            s.push_str(&pad(labels[g], w));
            let cols = if show_none { row.len() } else { row.len() - 1 };
            for v in &row[..cols] {
                s.push_str(&format!("  {v:>cw$}"));
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn perfect_predictions_score_one() {
        let m = Metrics::compute(&labels(&["a", "b"]), &[(0, Some(0)), (1, Some(1)), (1, Some(1))]);
        assert_eq!(m.accuracy, 1.0);
        assert_eq!(m.macro_f1, 1.0);
        assert_eq!(m.confusion, vec![vec![1, 0, 0], vec![0, 2, 0]]);
    }

    #[test]
    fn scores_match_hand_computation() {
        // gold a a a b b c ; predicted a a b b c (none)
        let pairs = [
            (0, Some(0)),
            (0, Some(0)),
            (0, Some(1)),
            (1, Some(1)),
            (1, Some(2)),
            (2, None),
        ];
        let m = Metrics::compute(&labels(&["a", "b", "c"]), &pairs);
        assert_eq!(m.n, 6);
        assert!((m.accuracy - 3.0 / 6.0).abs() < 1e-12);
        // a: P = 2/2, R = 2/3, F1 = 0.8
        let a = &m.per_class[0];
        assert!((a.precision - 1.0).abs() < 1e-12 && (a.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((a.f1 - 0.8).abs() < 1e-12);
        // b: P = 1/2, R = 1/2, F1 = 0.5
        assert!((m.per_class[1].f1 - 0.5).abs() < 1e-12);
        // c: predicted once (wrongly), never right: P = 0, R = 0, F1 = 0
        let c = &m.per_class[2];
        assert_eq!((c.precision, c.recall, c.f1, c.support), (0.0, 0.0, 0.0, 1));
        assert!((m.macro_f1 - (0.8 + 0.5 + 0.0) / 3.0).abs() < 1e-12);
        assert_eq!(m.parse_failures, 1);
        assert_eq!(m.confusion[2], vec![0, 0, 0, 1]);
        let t = m.table();
        assert!(t.contains("accuracy = 0.5000"), "{t}");
        assert!(t.contains("(none)"), "{t}");
    }

    #[test]
    fn a_class_never_predicted_has_zero_precision_not_nan() {
        let m = Metrics::compute(&labels(&["a", "b"]), &[(0, Some(0)), (1, Some(0))]);
        assert_eq!(m.per_class[1].precision, 0.0);
        assert!((m.per_class[0].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.macro_f1 - 1.0 / 3.0).abs() < 1e-12);
        assert!(m.macro_f1.is_finite());
    }
}
