//! Combining votes (CARP §4.3): majority vote, and weighted-probability vote
//! (the label with the highest probability summed over votes).

use super::backend::Vote;

/// Which combined label becomes an input's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteRule {
    Majority,
    Weighted,
}

/// The combined result of an input's votes.
#[derive(Debug, Clone, PartialEq)]
pub struct Combined {
    pub majority: Option<usize>,
    /// Falls back to the majority when a vote has no probabilities.
    pub weighted: Option<usize>,
    /// Mean label probabilities, when every vote has them.
    pub probs: Option<Vec<f64>>,
}

/// Combines `votes` over `n_labels` labels.
pub fn combine(votes: &[Vote], n_labels: usize) -> Combined {
    let mut count = vec![0usize; n_labels];
    for l in votes.iter().filter_map(|v| v.label) {
        count[l] += 1;
    }
    let sums: Option<Vec<f64>> = votes.iter().try_fold(vec![0.0; n_labels], |mut acc, v| {
        let p = v.probs.as_ref()?;
        acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        Some(acc)
    });
    let sums = sums.filter(|_| !votes.is_empty());
    let majority = (0..n_labels).filter(|&l| count[l] > 0).max_by(|&a, &b| {
        count[a]
            .cmp(&count[b])
            // Ties go to the higher total probability, then the earlier label.
            .then_with(|| match &sums {
                Some(s) => s[a].total_cmp(&s[b]),
                None => std::cmp::Ordering::Equal,
            })
            .then(b.cmp(&a))
    });
    let weighted = match &sums {
        Some(s) => (0..n_labels).max_by(|&a, &b| s[a].total_cmp(&s[b]).then(b.cmp(&a))),
        None => majority,
    };
    Combined {
        majority,
        weighted,
        probs: sums.map(|s| s.iter().map(|x| x / votes.len() as f64).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(label: Option<usize>, probs: Option<Vec<f64>>) -> Vote {
        Vote {
            label,
            probs,
            clues: String::new(),
            reasoning: String::new(),
        }
    }

    #[test]
    fn majority_and_weighted_can_disagree() {
        // Two weak votes for 0, one confident vote for 1.
        let v = [
            vote(Some(0), Some(vec![0.55, 0.45])),
            vote(Some(0), Some(vec![0.55, 0.45])),
            vote(Some(1), Some(vec![0.01, 0.99])),
        ];
        let c = combine(&v, 2);
        assert_eq!(c.majority, Some(0));
        assert_eq!(c.weighted, Some(1));
        let p = c.probs.unwrap();
        assert!((p[0] - 1.11 / 3.0).abs() < 1e-12 && (p[1] - 1.89 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn majority_tie_goes_to_higher_probability() {
        let v = [vote(Some(0), Some(vec![0.6, 0.4])), vote(Some(1), Some(vec![0.1, 0.9]))];
        assert_eq!(combine(&v, 2).majority, Some(1));
    }

    #[test]
    fn without_probabilities_weighted_is_majority_and_failures_do_not_vote() {
        let v = [
            vote(None, None),
            vote(Some(2), None),
            vote(Some(2), None),
            vote(Some(1), None),
        ];
        let c = combine(&v, 3);
        assert_eq!((c.majority, c.weighted, c.probs), (Some(2), Some(2), None));
        let c = combine(&[vote(None, None)], 3);
        assert_eq!((c.majority, c.weighted), (None, None));
    }
}
