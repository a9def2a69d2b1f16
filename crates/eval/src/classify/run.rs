//! Classifying a list of inputs: votes per input, combined, each result
//! appended to the results file as soon as it is ready.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::backend::{Backend, BackendStats, Vote};
use super::error::Result;
use super::input::Item;
use super::output::{Record, ResultsFile, VoteRecord};
use super::parallel::par_map;
use super::prompt::{Demo, Method, Prompts};
use super::voting::{combine, VoteRule};

/// How inputs are classified.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub method: Method,
    /// Answers per input; more than one samples each.
    pub votes: usize,
    pub rule: VoteRule,
    /// Inputs in flight at once.
    pub threads: usize,
    pub seed: u64,
    /// Demonstrations are dropped, least similar first, until the prompt fits.
    pub max_prompt_tokens: usize,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Inputs classified in this run.
    pub classified: usize,
    pub seconds: f64,
    pub stats: BackendStats,
}

impl RunSummary {
    /// Inputs per second.
    pub fn items_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.classified as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Classifies `items` (each with its demonstrations, least similar first),
/// appending one record per input to `out` and calling `on_record` after each.
pub fn classify_items(
    backend: &dyn Backend,
    prompts: &Prompts,
    opts: &RunOptions,
    items: &[(Item, Vec<Demo>)],
    out: &ResultsFile,
    stop: &AtomicBool,
    on_record: &(dyn Fn(&Record) + Sync),
) -> Result<RunSummary> {
    let start = Instant::now();
    let before = backend.stats();
    let names: Vec<String> = prompts.labels.names().iter().map(|s| s.to_string()).collect();
    let name = |l: Option<usize>| l.map(|i| names[i].clone());
    let probs_map = |p: &Option<Vec<f64>>| -> BTreeMap<String, f64> {
        p.iter()
            .flat_map(|p| names.iter().cloned().zip(p.iter().copied()))
            .collect()
    };
    // Inputs left without a label (every vote unparsed after the backend's
    // retries): a retry that then parses is not a failure of the input.
    let unparsed = std::sync::atomic::AtomicU64::new(0);
    par_map(opts.threads, items, stop, |_, (item, demos)| {
        let mut demos = demos.as_slice();
        while !demos.is_empty()
            && backend.count_tokens(&prompts.user_message(opts.method, demos, &item.text)) > opts.max_prompt_tokens
        {
            demos = &demos[1..];
        }
        let mut votes: Vec<Vote> = Vec::with_capacity(opts.votes);
        for v in 0..opts.votes.max(1) {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(super::error::ClassifyError::Interrupted);
            }
            let seed = (opts.votes > 1).then(|| seed_for(opts.seed, &item.id, v));
            votes.push(backend.classify(prompts, opts.method, demos, &item.text, seed)?);
        }
        let c = combine(&votes, names.len());
        let label = match opts.rule {
            VoteRule::Majority => c.majority,
            VoteRule::Weighted => c.weighted,
        };
        let shown = votes.iter().find(|v| v.label == label).unwrap_or(&votes[0]);
        let record = Record {
            id: item.id.clone(),
            text: item.text.clone(),
            label: name(label),
            probs: probs_map(&c.probs),
            clues: shown.clues.clone(),
            reasoning: shown.reasoning.clone(),
            votes: votes
                .iter()
                .map(|v| VoteRecord {
                    label: name(v.label),
                    probs: probs_map(&v.probs),
                    clues: v.clues.clone(),
                    reasoning: v.reasoning.clone(),
                })
                .collect(),
            majority: name(c.majority),
            weighted: name(c.weighted),
            gold: name(item.gold),
            parse_failures: votes.iter().filter(|v| v.label.is_none()).count(),
            demos: demos.iter().map(|d| d.id.clone()).collect(),
            scores: BTreeMap::new(),
        };
        if record.label.is_none() {
            unparsed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        out.append(&record)?;
        on_record(&record);
        Ok(())
    })?;
    let after = backend.stats();
    Ok(RunSummary {
        classified: items.len(),
        seconds: start.elapsed().as_secs_f64(),
        stats: BackendStats {
            prompt_tokens: after.prompt_tokens - before.prompt_tokens,
            completion_tokens: after.completion_tokens - before.completion_tokens,
            reused_tokens: after.reused_tokens - before.reused_tokens,
            parse_failures: unparsed.load(std::sync::atomic::Ordering::Relaxed),
        },
    })
}

/// A vote's sampling seed: the same run seed, input and vote give the same answer.
fn seed_for(seed: u64, id: &str, vote: usize) -> u64 {
    // FNV-1a: a stable hash (std's hasher may change between Rust releases).
    let mut h: u64 = 0xcbf29ce484222325 ^ seed;
    for b in id.bytes().chain((vote as u64).to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
