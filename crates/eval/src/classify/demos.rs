//! Few-shot demonstrations: chosen at random or by similarity (kNN over
//! embeddings, most similar placed last), with clues and reasoning written by
//! the model from each demonstration's gold label and cached on disk.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::backend::Backend;
use super::error::{ClassifyError, Result};
use super::input::Item;
use super::parallel::par_map;
use super::prompt::{Demo, Prompts};

/// How demonstrations are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoSelect {
    /// One seeded random draw, the same for every input (so every prompt shares it as a prefix).
    Random,
    /// The k most similar demonstrations to each input, the most similar last.
    Knn,
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    key: String,
    label: String,
    clues: String,
    reasoning: String,
    /// The start of the text, for a person reading the cache.
    text: String,
}

/// Clues and reasoning already written, keyed by model, language, label and text.
pub struct DemoCache {
    path: PathBuf,
    entries: Mutex<HashMap<String, (String, String)>>,
}

impl DemoCache {
    /// Loads the cache at `path` (missing means empty; a torn last line is ignored).
    pub fn open(path: &Path) -> Result<DemoCache> {
        let mut entries = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for line in text.lines() {
                    if let Ok(l) = serde_json::from_str::<CacheLine>(line) {
                        entries.insert(l.key, (l.clues, l.reasoning));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ClassifyError::io(path, e)),
        }
        Ok(DemoCache {
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
        })
    }

    fn key(model: &str, prompts: &Prompts, item: &Item) -> String {
        let label = item.gold.map(|g| prompts.labels.labels[g].name.as_str()).unwrap_or("");
        let mut h = Sha256::new();
        for part in [
            model,
            prompts.lang.code(),
            &prompts.task,
            label,
            &prompts.clip(&item.text),
        ] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        format!("{:x}", h.finalize())
    }

    fn get(&self, key: &str) -> Option<(String, String)> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    fn put(&self, key: String, label: &str, text: &str, clues: &str, reasoning: &str) -> Result<()> {
        let line = CacheLine {
            key: key.clone(),
            label: label.to_string(),
            clues: clues.to_string(),
            reasoning: reasoning.to_string(),
            text: text.chars().take(80).collect(),
        };
        let mut s = serde_json::to_string(&line).unwrap_or_default();
        s.push('\n');
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| ClassifyError::io(&self.path, e))?;
        // A torn line from an earlier crash would otherwise swallow this one.
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > 0 && !ends_with_newline(&self.path) {
            s.insert(0, '\n');
        }
        f.write_all(s.as_bytes())
            .map_err(|e| ClassifyError::io(&self.path, e))?;
        entries.insert(key, (clues.to_string(), reasoning.to_string()));
        Ok(())
    }
}

fn ends_with_newline(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return true;
    };
    if f.seek(SeekFrom::End(-1)).is_err() {
        return true;
    }
    let mut b = [0u8];
    f.read_exact(&mut b).is_ok() && b[0] == b'\n'
}

/// Threads, the stop flag, and a progress callback `(phase, done, total)`.
pub struct Workers<'a> {
    pub threads: usize,
    pub stop: &'a AtomicBool,
    pub progress: &'a (dyn Fn(&str, usize, usize) + Sync),
}

/// Which demonstrations each input gets, as indices into the pool, least similar first.
pub fn choose(
    backend: &dyn Backend,
    pool: &[Item],
    items: &[Item],
    k: usize,
    select: DemoSelect,
    seed: u64,
    w: &Workers,
) -> Result<Vec<Vec<usize>>> {
    let k = k.min(pool.len());
    match select {
        DemoSelect::Random => {
            let mut idx: Vec<usize> = (0..pool.len()).collect();
            idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            idx.truncate(k);
            Ok(items
                .iter()
                .map(|it| idx.iter().copied().filter(|&d| !same(&pool[d], it)).collect())
                .collect())
        }
        DemoSelect::Knn => {
            let done = std::sync::atomic::AtomicUsize::new(0);
            let total = pool.len() + items.len();
            let texts: Vec<&str> = pool.iter().chain(items).map(|i| i.text.as_str()).collect();
            let embs = par_map(w.threads, &texts, w.stop, |_, t| {
                let e = unit(backend.embed(t)?);
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                (w.progress)("embedding", n, total);
                Ok(e)
            })?;
            let (pool_e, item_e) = embs.split_at(pool.len());
            Ok(items
                .iter()
                .zip(item_e)
                .map(|(it, e)| {
                    let mut scored: Vec<(f32, usize)> = pool_e
                        .iter()
                        .enumerate()
                        .filter(|(d, _)| !same(&pool[*d], it))
                        .map(|(d, pe)| (dot(e, pe), d))
                        .collect();
                    // Most similar first, keep k, then put the most similar last.
                    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    scored.truncate(k);
                    scored.reverse();
                    scored.into_iter().map(|(_, d)| d).collect()
                })
                .collect())
        }
    }
}

/// An input never serves as its own demonstration.
fn same(a: &Item, b: &Item) -> bool {
    a.text.trim() == b.text.trim()
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The demonstrations at `needed` (pool indices) with their clues and reasoning,
/// from the cache or written now by the model (in parallel) and cached.
pub fn explain(
    backend: &dyn Backend,
    prompts: &Prompts,
    pool: &[Item],
    needed: &[usize],
    cache: &DemoCache,
    w: &Workers,
) -> Result<HashMap<usize, Demo>> {
    let model = backend.model_id();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let demos = par_map(w.threads, needed, w.stop, |_, &d| {
        let item = &pool[d];
        let label = item.gold.ok_or_else(|| {
            ClassifyError::Setting(format!(
                "demonstration {} (line {}) has no gold label",
                item.id, item.line
            ))
        })?;
        let key = DemoCache::key(&model, prompts, item);
        let (clues, reasoning) = match cache.get(&key) {
            Some(hit) => hit,
            None => {
                let (c, r) = backend.explain(prompts, &item.text, label)?;
                cache.put(key, &prompts.labels.labels[label].name, &item.text, &c, &r)?;
                (c, r)
            }
        };
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (w.progress)("demonstrations", n, needed.len());
        Ok((
            d,
            Demo {
                id: item.id.clone(),
                text: item.text.clone(),
                label,
                clues,
                reasoning,
            },
        ))
    })?;
    Ok(demos.into_iter().collect())
}
