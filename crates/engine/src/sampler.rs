//! Choosing the next token from logits: penalties, temperature, top-k, top-p, and a
//! seeded random draw. The order follows HF transformers (penalties, then
//! temperature, then top-k, then top-p).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::request::SamplingParams;

/// Picks tokens for one sequence; owns that sequence's random state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token has been generated (for the OpenAI penalties).
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler seeded from `params.seed`, or from the OS when unseeded.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            counts: Default::default(),
        }
    }

    /// Records a generated token (for presence/frequency penalties).
    pub fn observe(&mut self, id: u32) {
        *self.counts.entry(id).or_default() += 1;
    }

    /// Chooses the next token. `seen` are all tokens so far (prompt and generated),
    /// for the repetition penalty. `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        let p = &self.params;
        for &(id, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut done = std::collections::HashSet::new();
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    if done.insert(t) {
                        *l = if *l < 0.0 {
                            *l * p.repetition_penalty
                        } else {
                            *l / p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        if p.min_p > 0.0 {
            // p(t) >= min_p * p(top)  <=>  l(t) >= l(top) + ln(min_p).
            let top = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
            let floor = top + p.min_p.ln();
            cand.retain(|c| c.1 >= floor);
        }
        // Candidates in order: highest first, ties to the lower id (so a draw is
        // deterministic for a seed). Only as much of the vocabulary as top-k and
        // top-p keep is ever sorted: sorting all 49k logits per token cost ~2 ms,
        // more than the forward pass of a batched decode step.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, order);
            cand.truncate(p.top_k);
        }
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        if p.top_p >= 1.0 {
            // Every candidate stays: draw by walking them in any fixed order.
            let r = self.rng.random::<f32>() * sum;
            let mut acc = 0.0;
            for (c, &q) in cand.iter().zip(&probs) {
                acc += q;
                if r < acc {
                    return c.0;
                }
            }
            return cand[cand.len() - 1].0;
        }
        // Top-p: the smallest set of most likely tokens whose mass reaches p.
        // Sort a growing prefix until it does.
        let target = p.top_p * sum;
        let mut m = 64.min(cand.len());
        let keep = loop {
            if m < cand.len() {
                cand.select_nth_unstable_by(m - 1, order);
            }
            cand[..m].sort_unstable_by(order);
            let mut acc = 0.0;
            let hit = cand[..m].iter().position(|(_, l)| {
                acc += (l - max).exp();
                acc >= target
            });
            match hit {
                Some(i) => break i + 1,
                None if m == cand.len() => break m,
                None => m = (m * 4).min(cand.len()),
            }
        };
        let kept: Vec<f32> = cand[..keep].iter().map(|(_, l)| (l - max).exp()).collect();
        let s: f32 = kept.iter().sum();
        let r = self.rng.random::<f32>() * s;
        let mut acc = 0.0;
        for (c, &q) in cand.iter().zip(&kept) {
            acc += q;
            if r < acc {
                return c.0;
            }
        }
        cand[keep - 1].0
    }
}

/// Index of the largest logit, lowest index on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    // The answer of `for i { if l[i] > l[best] { best = i } }`, in two passes the
    // compiler vectorizes (that loop ran ~40 µs over 49k logits per sampled
    // token, on the decode step's critical path): the maximum in 16 independent
    // lanes, then the first chunk holding it. NaN never compares greater, so a
    // leading NaN keeps index 0, as in the loop.
    const W: usize = 16;
    let Some(&first) = logits.first() else {
        return 0;
    };
    let mut lanes = [first; W];
    let chunks = logits.chunks_exact(W);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(first, |m, &l| if l > m { l } else { m });
    let at = logits
        .chunks(W)
        .position(|c| c.iter().fold(false, |hit, &l| hit | (l == max)))
        .unwrap_or(0);
    let within = logits[at * W..].iter().take(W).position(|&l| l == max).unwrap_or(0);
    (at * W + within) as u32
}

/// Natural-log softmax.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|l| l - lse).collect()
}

/// The `n` largest entries as (index, value), largest first.
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = values.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    idx.truncate(n);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            seed: Some(7),
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    /// The chunked argmax against the plain loop it replaces: the first index of
    /// the largest logit, ties (also across chunks and in the tail), a leading
    /// NaN (index 0, as the loop gives) and NaNs elsewhere (never chosen).
    #[test]
    fn argmax_matches_the_plain_loop() {
        let plain = |l: &[f32]| {
            let mut best = 0;
            for (i, &v) in l.iter().enumerate() {
                if v > l[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut rng = StdRng::seed_from_u64(3);
        for len in [1, 5, 16, 17, 33, 100, 49152] {
            for case in 0..6 {
                // Few distinct values, so ties are common.
                let mut l: Vec<f32> = (0..len).map(|_| rng.random_range(0..7) as f32 - 3.0).collect();
                match case {
                    1 => l[len / 2] = f32::NAN,
                    2 => l[0] = f32::NAN,
                    3 => l.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                    4 => l[len - 1] = 9.0,
                    5 => l[rng.random_range(0..len)] = f32::INFINITY,
                    _ => {}
                }
                assert_eq!(argmax(&l), plain(&l), "len {len}, case {case}");
            }
        }
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        // 3.0 / 2 = 1.5 < 2.0, so token 2 wins once token 1 was seen.
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = vec![1.0f32, 1.1, 0.9, 1.05, 0.2];
        let draw = || {
            let mut s = Sampler::new(params(1.0));
            (0..32).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(), draw());
        assert!(draw().iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(1.0)
        });
        assert_eq!(s.sample(&mut [0.0, 5.0, 1.0], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 5.0, 1.0], &[]), 1);
        }
    }

    /// On a vocabulary-sized row: draws follow softmax(logits / t); top-k draws only
    /// the k largest; top-p only the smallest set reaching p (here ids 3, 9, 27).
    #[test]
    fn draws_follow_the_distribution_and_respect_top_k_and_top_p() {
        let mut logits = vec![-20.0f32; 49_152];
        for (id, l) in [(3usize, 2.0f32), (9, 1.5), (27, 1.0), (40_000, 0.5), (81, 0.0)] {
            logits[id] = l;
        }
        let probs: Vec<f32> = log_softmax(&logits).iter().map(|l| l.exp()).collect();
        let counts = |params: SamplingParams, n: usize| {
            let mut s = Sampler::new(params);
            let mut c = std::collections::HashMap::new();
            for _ in 0..n {
                *c.entry(s.sample(&mut logits.clone(), &[])).or_insert(0usize) += 1;
            }
            c
        };
        let n = 4000;
        let c = counts(params(1.0), n);
        for id in [3usize, 9, 27, 40_000, 81] {
            let got = c.get(&(id as u32)).copied().unwrap_or(0) as f32 / n as f32;
            assert!(
                (got - probs[id]).abs() < 0.03,
                "id {id}: drawn {got}, probability {}",
                probs[id]
            );
        }
        let c = counts(
            SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            400,
        );
        assert!(c.keys().all(|&id| id == 3 || id == 9), "top-k 2 drew {c:?}");
        // Mass of 3, 9, 27: 0.43 + 0.26 + 0.16 = 0.85 of the total (0.69 without 27).
        let c = counts(
            SamplingParams {
                top_p: 0.8,
                ..params(1.0)
            },
            400,
        );
        assert!(
            c.keys().all(|&id| [3, 9, 27].contains(&id)) && c.len() == 3,
            "top-p drew {c:?}"
        );
    }

    #[test]
    fn logit_bias_and_min_p_change_what_is_drawn() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(0, 100.0)],
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [0.0, 5.0, 1.0], &[]), 0);
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..params(0.0)
        });
        assert_eq!(s.sample(&mut [0.0, 5.0, 1.0], &[]), 2);
        // Token 1 is e^-1 ≈ 0.37 as likely as token 0: min_p 0.5 drops it.
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [2.0, 1.0, -5.0], &[]), 0);
        }
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(top_n(&l, 2).iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 1]);
    }
}
