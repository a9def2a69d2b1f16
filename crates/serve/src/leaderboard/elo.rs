//! Ratings from pairwise votes, as FastChat's `elo_analysis.py`: online Elo
//! (`compute_elo`), bootstrap confidence intervals (`get_bootstrap_result`) and
//! the pairwise win-fraction matrix (`compute_pairwise_win_fraction`).

use std::collections::{BTreeMap, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Who won one battle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Winner {
    ModelA,
    ModelB,
    Tie,
    /// "Both are bad": a tie for the rating.
    TieBothBad,
}

impl Winner {
    /// Model A's score: 1 win, 0 loss, 0.5 tie.
    pub fn score_a(self) -> f64 {
        match self {
            Winner::ModelA => 1.0,
            Winner::ModelB => 0.0,
            Winner::Tie | Winner::TieBothBad => 0.5,
        }
    }

    /// The winner of a FastChat vote type (`leftvote`, `rightvote`, `tievote`, `bothbad_vote`).
    pub fn from_vote(vote: &str) -> Option<Winner> {
        match vote {
            "leftvote" => Some(Winner::ModelA),
            "rightvote" => Some(Winner::ModelB),
            "tievote" => Some(Winner::Tie),
            "bothbad_vote" => Some(Winner::TieBothBad),
            _ => None,
        }
    }

    pub fn is_tie(self) -> bool {
        matches!(self, Winner::Tie | Winner::TieBothBad)
    }
}

/// One vote between two models.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Battle {
    pub model_a: String,
    pub model_b: String,
    pub winner: Winner,
    /// Cast in the anonymous arena (names hidden until the vote).
    pub anony: bool,
    pub tstamp: f64,
    /// The voter's address as logged ("" when unknown); not rated, only used
    /// to leave out flagged addresses.
    #[serde(skip)]
    pub ip: String,
}

/// The constants of FastChat's `compute_elo`.
#[derive(Debug, Clone, Copy)]
pub struct EloParams {
    pub k: f64,
    pub scale: f64,
    pub base: f64,
    pub init: f64,
}

impl Default for EloParams {
    fn default() -> Self {
        EloParams {
            k: 4.0,
            scale: 400.0,
            base: 10.0,
            init: 1000.0,
        }
    }
}

/// Online Elo over the battles in order: each vote moves both ratings by
/// `k * (score - expected)`.
pub fn compute_elo<'a>(battles: impl IntoIterator<Item = &'a Battle>, p: EloParams) -> BTreeMap<String, f64> {
    let mut rating: BTreeMap<String, f64> = BTreeMap::new();
    for b in battles {
        let ra = *rating.entry(b.model_a.clone()).or_insert(p.init);
        let rb = *rating.entry(b.model_b.clone()).or_insert(p.init);
        let ea = 1.0 / (1.0 + p.base.powf((rb - ra) / p.scale));
        let eb = 1.0 / (1.0 + p.base.powf((ra - rb) / p.scale));
        let sa = b.winner.score_a();
        *rating.get_mut(&b.model_a).expect("inserted above") += p.k * (sa - ea);
        *rating.get_mut(&b.model_b).expect("inserted above") += p.k * (1.0 - sa - eb);
    }
    rating
}

/// Online Elo over battles given as (index of A, index of B, A's score).
fn elo_indexed(battles: impl Iterator<Item = (usize, usize, f64)>, n: usize, p: EloParams) -> Vec<f64> {
    let mut rating = vec![p.init; n];
    for (a, b, sa) in battles {
        let (ra, rb) = (rating[a], rating[b]);
        let ea = 1.0 / (1.0 + p.base.powf((rb - ra) / p.scale));
        let eb = 1.0 / (1.0 + p.base.powf((ra - rb) / p.scale));
        rating[a] += p.k * (sa - ea);
        rating[b] += p.k * (1.0 - sa - eb);
    }
    rating
}

/// `compute_elo` on `rounds` resamples (with replacement, same size) of the
/// battles; per model, the ratings it got in the rounds where it played.
pub fn bootstrap(battles: &[Battle], p: EloParams, rounds: usize, seed: u64) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    if battles.is_empty() {
        return out;
    }
    // Names to indices once; each round is then plain arithmetic.
    let mut names: Vec<&str> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut coded: Vec<(usize, usize, f64)> = Vec::with_capacity(battles.len());
    for b in battles {
        let mut ab = [0usize; 2];
        for (slot, m) in ab.iter_mut().zip([b.model_a.as_str(), b.model_b.as_str()]) {
            *slot = *index.entry(m).or_insert_with(|| {
                names.push(m);
                names.len() - 1
            });
        }
        coded.push((ab[0], ab[1], b.winner.score_a()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut played = vec![false; names.len()];
    let mut sample: Vec<usize> = vec![0; coded.len()];
    for _ in 0..rounds {
        played.iter_mut().for_each(|x| *x = false);
        for s in sample.iter_mut() {
            *s = rng.random_range(0..coded.len());
        }
        for &i in &sample {
            played[coded[i].0] = true;
            played[coded[i].1] = true;
        }
        let r = elo_indexed(sample.iter().map(|&i| coded[i]), names.len(), p);
        for (m, name) in names.iter().enumerate() {
            if played[m] {
                out.entry(name.to_string()).or_default().push(r[m]);
            }
        }
    }
    out
}

/// The `q` quantile (0..=1) with linear interpolation, as pandas' default.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// `m[i][j]`: the fraction of the non-tied battles between models `i` and `j`
/// that `i` won (None when they never met without a tie).
pub fn win_fraction(battles: &[Battle], order: &[String]) -> Vec<Vec<Option<f64>>> {
    let idx: HashMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let n = order.len();
    let mut wins = vec![vec![0u64; n]; n];
    let mut games = vec![vec![0u64; n]; n];
    for b in battles.iter().filter(|b| !b.winner.is_tie()) {
        let (Some(&a), Some(&bb)) = (idx.get(b.model_a.as_str()), idx.get(b.model_b.as_str())) else {
            continue;
        };
        games[a][bb] += 1;
        games[bb][a] += 1;
        match b.winner {
            Winner::ModelA => wins[a][bb] += 1,
            _ => wins[bb][a] += 1,
        }
    }
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (games[i][j] > 0).then(|| wins[i][j] as f64 / games[i][j] as f64))
                .collect()
        })
        .collect()
}

/// One model's line of the leaderboard.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub rank: usize,
    pub model: String,
    /// Online Elo over all battles in the order they were cast.
    pub rating: f64,
    /// 95% interval of the bootstrap ratings (2.5% and 97.5% quantiles).
    pub ci_low: f64,
    pub ci_high: f64,
    /// Battles the model took part in.
    pub votes: u64,
    pub wins: u64,
    pub losses: u64,
    pub ties: u64,
}

/// Ratings, vote counts and the win-fraction matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Leaderboard {
    pub rows: Vec<Row>,
    /// The models in rating order (rows and columns of `win_fraction`).
    pub models: Vec<String>,
    pub win_fraction: Vec<Vec<Option<f64>>>,
    pub battles: usize,
    pub bootstrap_rounds: usize,
}

/// Bootstrap rounds the page and `vicugna leaderboard` use by default.
pub const DEFAULT_ROUNDS: usize = 1000;
/// Fixed seed, so the same logs give the same intervals.
pub const DEFAULT_SEED: u64 = 42;

impl Leaderboard {
    /// The leaderboard of `battles` (in the order they were cast).
    pub fn compute(battles: &[Battle], rounds: usize, seed: u64) -> Leaderboard {
        let p = EloParams::default();
        let online = compute_elo(battles, p);
        let boot = bootstrap(battles, p, rounds, seed);
        let mut rows: Vec<Row> = online
            .iter()
            .map(|(m, &rating)| {
                let samples = boot.get(m).map(Vec::as_slice).unwrap_or(&[]);
                let mut row = Row {
                    rank: 0,
                    model: m.clone(),
                    rating,
                    ci_low: quantile(samples, 0.025).unwrap_or(rating),
                    ci_high: quantile(samples, 0.975).unwrap_or(rating),
                    votes: 0,
                    wins: 0,
                    losses: 0,
                    ties: 0,
                };
                for b in battles.iter() {
                    let side_a = b.model_a == *m;
                    if !side_a && b.model_b != *m {
                        continue;
                    }
                    row.votes += 1;
                    match (b.winner, side_a) {
                        (w, _) if w.is_tie() => row.ties += 1,
                        (Winner::ModelA, true) | (Winner::ModelB, false) => row.wins += 1,
                        _ => row.losses += 1,
                    }
                }
                row
            })
            .collect();
        rows.sort_by(|a, b| b.rating.total_cmp(&a.rating).then_with(|| a.model.cmp(&b.model)));
        for (i, r) in rows.iter_mut().enumerate() {
            r.rank = i + 1;
        }
        let models: Vec<String> = rows.iter().map(|r| r.model.clone()).collect();
        Leaderboard {
            win_fraction: win_fraction(battles, &models),
            models,
            rows,
            battles: battles.len(),
            bootstrap_rounds: rounds,
        }
    }

    /// A plain-text table: ratings, then the win-fraction matrix.
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let w = self.models.iter().map(|m| m.chars().count()).max().unwrap_or(5).max(5);
        let _ = writeln!(
            s,
            "{} battles; 95% intervals from {} bootstrap rounds",
            self.battles, self.bootstrap_rounds
        );
        let _ = writeln!(
            s,
            "{:>4}  {:<w$}  {:>7}  {:>17}  {:>5}  {:>4}  {:>6}  {:>4}",
            "rank", "model", "rating", "95% CI", "votes", "wins", "losses", "ties"
        );
        for r in &self.rows {
            let ci = format!("{:.1} .. {:.1}", r.ci_low, r.ci_high);
            let _ = writeln!(
                s,
                "{:>4}  {:<w$}  {:>7.1}  {:>17}  {:>5}  {:>4}  {:>6}  {:>4}",
                r.rank, r.model, r.rating, ci, r.votes, r.wins, r.losses, r.ties
            );
        }
        if self.models.len() > 1 {
            let _ = writeln!(
                s,
                "\nwin fraction of the row model against the column model (ties left out):"
            );
            let cw = w.max(6);
            let _ = write!(s, "{:<w$}", "");
            for m in &self.models {
                let _ = write!(s, "  {m:>cw$}");
            }
            let _ = writeln!(s);
            for (i, m) in self.models.iter().enumerate() {
                let _ = write!(s, "{m:<w$}");
                for v in &self.win_fraction[i] {
                    match v {
                        Some(f) => {
                            let _ = write!(s, "  {f:>cw$.2}");
                        }
                        None => {
                            let _ = write!(s, "  {:>cw$}", "-");
                        }
                    }
                }
                let _ = writeln!(s);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(a: &str, bm: &str, w: Winner) -> Battle {
        Battle {
            model_a: a.into(),
            model_b: bm.into(),
            winner: w,
            anony: true,
            tstamp: 0.0,
            ip: String::new(),
        }
    }

    #[test]
    fn first_win_moves_both_by_half_k() {
        // Equal ratings expect 0.5 each: the winner gains K/2 = 2, the loser drops 2.
        let r = compute_elo(&[b("x", "y", Winner::ModelA)], EloParams::default());
        assert_eq!(r["x"], 1002.0);
        assert_eq!(r["y"], 998.0);
    }

    #[test]
    fn tie_between_equals_changes_nothing() {
        let r = compute_elo(&[b("x", "y", Winner::Tie)], EloParams::default());
        assert_eq!((r["x"], r["y"]), (1000.0, 1000.0));
        let r = compute_elo(&[b("x", "y", Winner::TieBothBad)], EloParams::default());
        assert_eq!((r["x"], r["y"]), (1000.0, 1000.0));
    }

    #[test]
    fn second_vote_uses_updated_ratings() {
        // After x beats y: 1002 vs 998. y now wins: E_y = 1/(1+10^(4/400)).
        let r = compute_elo(
            &[b("x", "y", Winner::ModelA), b("x", "y", Winner::ModelB)],
            EloParams::default(),
        );
        let ey = 1.0 / (1.0 + 10f64.powf(4.0 / 400.0));
        assert!((r["y"] - (998.0 + 4.0 * (1.0 - ey))).abs() < 1e-9);
        assert!((r["x"] - (1002.0 - 4.0 * (1.0 - ey))).abs() < 1e-9);
        // Elo is zero-sum.
        assert!((r["x"] + r["y"] - 2000.0).abs() < 1e-9);
    }

    #[test]
    fn k_scales_the_step() {
        let p = EloParams {
            k: 32.0,
            ..EloParams::default()
        };
        let r = compute_elo(&[b("x", "y", Winner::ModelA), b("z", "x", Winner::Tie)], p);
        assert_eq!(
            (r["x"], r["y"]),
            (1016.0 + 32.0 * (0.5 - 1.0 / (1.0 + 10f64.powf(-16.0 / 400.0))), 984.0)
        );
        // z (1000) tied x (1016): z was the underdog and gains what x loses.
        assert!(r["z"] > 1000.0);
        assert!((r["x"] + r["y"] + r["z"] - 3000.0).abs() < 1e-9);
    }

    #[test]
    fn matches_fastchat_compute_elo() {
        // FastChat's compute_elo (elo_analysis.py) in Python on the same seven
        // votes printed these ratings.
        use Winner::*;
        let votes = [
            ("x", "y", ModelA),
            ("y", "z", ModelB),
            ("z", "x", Tie),
            ("x", "z", ModelA),
            ("y", "x", TieBothBad),
            ("z", "y", ModelA),
            ("x", "y", ModelB),
        ];
        let battles: Vec<Battle> = votes.iter().map(|(a, bm, w)| b(a, bm, *w)).collect();
        let r = compute_elo(&battles, EloParams::default());
        for (m, want) in [
            ("x", 1001.8970689336938),
            ("y", 996.1369405171123),
            ("z", 1001.9659905491939),
        ] {
            assert!((r[m] - want).abs() < 1e-9, "{m}: {} vs {want}", r[m]);
        }
    }

    #[test]
    fn model_b_side_counts_too() {
        let r = compute_elo(&[b("x", "y", Winner::ModelB)], EloParams::default());
        assert_eq!((r["x"], r["y"]), (998.0, 1002.0));
    }

    #[test]
    fn quantile_interpolates_like_pandas() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), Some(2.5));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 1.0), Some(4.0));
        assert!((quantile(&v, 0.025).unwrap() - 1.075).abs() < 1e-12);
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_rating() {
        let mut battles = vec![];
        for i in 0..30 {
            let w = if i % 3 == 0 { Winner::ModelB } else { Winner::ModelA };
            battles.push(b("strong", "weak", w));
        }
        let l1 = Leaderboard::compute(&battles, 200, 7);
        let l2 = Leaderboard::compute(&battles, 200, 7);
        assert_eq!(l1.rows[0].ci_low, l2.rows[0].ci_low);
        assert_eq!(l1.rows[0].model, "strong");
        let s = &l1.rows[0];
        assert!(s.ci_low <= s.ci_high);
        assert!(s.ci_low < 1040.0 && s.ci_high > 1000.0, "{s:?}");
        assert_eq!((s.votes, s.wins, s.losses, s.ties), (30, 20, 10, 0));
        assert_eq!(l1.rows[1].rank, 2);
    }

    #[test]
    fn win_fraction_ignores_ties_and_counts_both_sides() {
        let battles = vec![
            b("x", "y", Winner::ModelA),
            b("y", "x", Winner::ModelA),
            b("y", "x", Winner::ModelB),
            b("x", "y", Winner::Tie),
            b("x", "z", Winner::TieBothBad),
        ];
        let order: Vec<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
        let m = win_fraction(&battles, &order);
        assert_eq!(m[0][1], Some(2.0 / 3.0));
        assert_eq!(m[1][0], Some(1.0 / 3.0));
        assert_eq!(m[0][2], None);
        assert_eq!(m[0][0], None);
    }

    #[test]
    fn text_table_lists_every_model() {
        let l = Leaderboard::compute(&[b("x", "y", Winner::ModelA)], 10, 1);
        let t = l.render_text();
        assert!(t.contains("1002.0") && t.contains("998.0"), "{t}");
        assert!(t.contains("win fraction"), "{t}");
    }
}
