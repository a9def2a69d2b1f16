//! `--method baseline`: a classical classifier trained on the labelled
//! examples, so a user sees whether a language model earns its cost on their
//! data. Character n-gram TF-IDF features (no tokenizer, so Chinese and
//! English alike) and a multinomial logistic regression (linfa-logistic, L-BFGS).

use std::collections::HashMap;

use linfa::prelude::*;
use linfa_logistic::{MultiFittedLogisticRegression, MultiLogisticRegression};
use ndarray::{Array1, Array2};

use super::error::{ClassifyError, Result};

/// Feature and training settings.
#[derive(Debug, Clone)]
pub struct BaselineOptions {
    /// Character n-gram lengths, inclusive.
    pub ngrams: (usize, usize),
    /// At most this many features, the most frequent across documents.
    pub max_features: usize,
    /// L2 penalty.
    pub alpha: f64,
    pub max_iterations: u64,
}

impl BaselineOptions {
    /// 1–2-grams for Chinese (a character is already a word piece), 2–4 for
    /// alphabetic text.
    pub fn for_lang(chinese: bool) -> BaselineOptions {
        BaselineOptions {
            ngrams: if chinese { (1, 2) } else { (2, 4) },
            max_features: 20_000,
            alpha: 0.01,
            max_iterations: 200,
        }
    }
}

/// A trained TF-IDF + logistic regression classifier.
pub struct Baseline {
    opts: BaselineOptions,
    vocab: HashMap<String, usize>,
    idf: Vec<f64>,
    model: MultiFittedLogisticRegression<f64, usize>,
    labels: usize,
}

fn grams(text: &str, (lo, hi): (usize, usize)) -> Vec<String> {
    let norm: Vec<char> = format!(
        " {} ",
        text.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
    )
    .chars()
    .collect();
    let mut out = Vec::new();
    for n in lo.max(1)..=hi.max(lo.max(1)) {
        for w in norm.windows(n) {
            out.push(w.iter().collect());
        }
    }
    out
}

impl Baseline {
    /// Trains on `(text, label index)` pairs over `labels` labels.
    pub fn train(examples: &[(String, usize)], labels: usize, opts: BaselineOptions) -> Result<Baseline> {
        let classes: std::collections::BTreeSet<usize> = examples.iter().map(|e| e.1).collect();
        if classes.len() < 2 {
            return Err(ClassifyError::Setting(format!(
                "the baseline needs labelled examples of at least 2 labels; the training file has {}",
                classes.len()
            )));
        }
        // Document frequency of each n-gram.
        let mut df: HashMap<String, usize> = HashMap::new();
        let docs: Vec<Vec<String>> = examples.iter().map(|(t, _)| grams(t, opts.ngrams)).collect();
        for d in &docs {
            let mut seen: Vec<&String> = d.iter().collect();
            seen.sort_unstable();
            seen.dedup();
            for g in seen {
                *df.entry(g.clone()).or_default() += 1;
            }
        }
        let mut terms: Vec<(String, usize)> = df.into_iter().collect();
        // Most frequent first, ties by text so the vocabulary is deterministic.
        terms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        terms.truncate(opts.max_features);
        let n = examples.len() as f64;
        let idf: Vec<f64> = terms
            .iter()
            .map(|(_, d)| ((1.0 + n) / (1.0 + *d as f64)).ln() + 1.0)
            .collect();
        let vocab: HashMap<String, usize> = terms.into_iter().enumerate().map(|(i, (t, _))| (t, i)).collect();
        let x = tfidf(&vocab, &idf, &docs);
        let y = Array1::from_iter(examples.iter().map(|e| e.1));
        let ds = Dataset::new(x, y);
        let model = MultiLogisticRegression::default()
            .alpha(opts.alpha)
            .max_iterations(opts.max_iterations)
            .fit(&ds)
            .map_err(|e| ClassifyError::Setting(format!("training the baseline failed: {e}")))?;
        Ok(Baseline {
            opts,
            vocab,
            idf,
            model,
            labels,
        })
    }

    /// Each text's probability per label (label order; labels absent from training get 0).
    pub fn predict(&self, texts: &[&str]) -> Vec<Vec<f64>> {
        let docs: Vec<Vec<String>> = texts.iter().map(|t| grams(t, self.opts.ngrams)).collect();
        let x = tfidf(&self.vocab, &self.idf, &docs);
        let p = self.model.predict_probabilities(&x);
        let classes = self.model.classes();
        p.rows()
            .into_iter()
            .map(|row| {
                let mut out = vec![0.0; self.labels];
                for (c, v) in classes.iter().zip(row.iter()) {
                    out[*c] = *v;
                }
                out
            })
            .collect()
    }
}

/// Sublinear TF × IDF, L2-normalised rows.
fn tfidf(vocab: &HashMap<String, usize>, idf: &[f64], docs: &[Vec<String>]) -> Array2<f64> {
    let mut x = Array2::<f64>::zeros((docs.len(), idf.len()));
    for (r, d) in docs.iter().enumerate() {
        let mut tf: HashMap<usize, f64> = HashMap::new();
        for g in d {
            if let Some(&i) = vocab.get(g) {
                *tf.entry(i).or_default() += 1.0;
            }
        }
        let mut norm = 0.0;
        for (&i, &c) in &tf {
            let v = (1.0 + c.ln()) * idf[i];
            x[[r, i]] = v;
            norm += v * v;
        }
        if norm > 0.0 {
            let s = norm.sqrt();
            x.row_mut(r).mapv_inplace(|v| v / s);
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_two_obvious_classes() {
        let mut ex = Vec::new();
        for i in 0..10 {
            ex.push((format!("great wonderful lovely {i}"), 0));
            ex.push((format!("awful terrible broken {i}"), 1));
        }
        let b = Baseline::train(&ex, 2, BaselineOptions::for_lang(false)).unwrap();
        let p = b.predict(&["a wonderful lovely thing", "terrible and broken"]);
        assert!(p[0][0] > 0.5 && p[1][1] > 0.5, "{p:?}");
    }
}
