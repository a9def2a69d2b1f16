//! `delta apply` (target = base + delta) and `delta make` (delta = target - base),
//! as FastChat's `apply_delta` / `make_delta` do, streamed in chunks of elements.
//!
//! Arithmetic follows torch: both operands are first cast to the output dtype,
//! then added (or subtracted) and rounded once to that dtype, so a float16 result
//! is bit for bit FastChat's. A vocabulary grown by added tokens (an embedding or
//! output matrix with more rows in the delta/target than in the base) is handled
//! as LLaVA's and early FastChat's scripts do: the shared rows are combined, the
//! extra rows are taken as they are.

use std::path::Path;

use rayon::prelude::*;

use crate::atomic_output::{copy_side_files, set_config_dtype, AtomicOutput};
use crate::elementwise::{encode, round_to};
use crate::error::{Result, WeightsError};
use crate::safetensors_io::{verify_checkpoint, Checkpoint, Float, OutTensor, ShardedWriter, TensorInfo};
use crate::Progress;

/// Elements per chunk: small enough to keep memory flat, large enough for fast I/O.
const CHUNK: usize = 1 << 20;

/// Options shared by whole-checkpoint jobs.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Output dtype; `None` keeps the dtype of the delta (apply) or target (make).
    pub dtype: Option<Float>,
    /// Largest shard, in bytes.
    pub max_shard_bytes: u64,
    /// Re-read the output and check every tensor's checksum before it is renamed into place.
    pub verify: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            dtype: None,
            max_shard_bytes: crate::DEFAULT_MAX_SHARD,
            verify: false,
        }
    }
}

/// What a job wrote.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub tensors: usize,
    pub bytes: u64,
    pub shards: usize,
    pub verified: bool,
    pub side_files: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Apply,
    Make,
}

/// Writes `target` = `base` + `delta`, with the delta's config and tokenizer files.
pub fn apply(
    base: &Path,
    delta: &Path,
    target: &Path,
    opts: &JobOptions,
    progress: &dyn Progress,
) -> Result<JobReport> {
    combine(Direction::Apply, base, delta, target, opts, progress)
}

/// Writes `delta` = `target` - `base`, with the target's config and tokenizer files.
pub fn make(base: &Path, target: &Path, delta: &Path, opts: &JobOptions, progress: &dyn Progress) -> Result<JobReport> {
    combine(Direction::Make, base, target, delta, opts, progress)
}

/// Embedding and output matrices, the tensors whose rows follow the vocabulary.
fn is_vocab_tensor(name: &str) -> bool {
    name.ends_with("embed_tokens.weight") || name == "lm_head.weight"
}

/// Checks that `a` (base) and `b` (delta or target) hold the same tensors; lists
/// every problem at once.
fn check_pair(a: &Checkpoint, b: &Checkpoint) -> Result<()> {
    let (ad, bd) = (a.dir.display(), b.dir.display());
    let mut problems = Vec::new();
    for t in &b.tensors {
        let Some(at) = a.get(&t.name) else {
            problems.push(format!("{}: in {bd} but not in {ad}", t.name));
            continue;
        };
        for (x, dir) in [(t, &bd), (at, &ad)] {
            if x.float().is_none() {
                problems.push(format!(
                    "{}: dtype {} in {dir}; expected f32, f16 or bf16",
                    x.name, x.dtype
                ));
            }
        }
        if t.shape == at.shape {
            continue;
        }
        let grown_vocab = is_vocab_tensor(&t.name)
            && t.shape.len() == 2
            && at.shape.len() == 2
            && t.shape[1] == at.shape[1]
            && t.shape[0] > at.shape[0];
        if !grown_vocab {
            problems.push(format!(
                "{}: shape {:?} in {bd} but {:?} in {ad}{}",
                t.name,
                t.shape,
                at.shape,
                if is_vocab_tensor(&t.name) {
                    " (only added vocabulary rows, more rows than the base, can be combined)"
                } else {
                    ""
                }
            ));
        }
    }
    for t in &a.tensors {
        if b.get(&t.name).is_none() {
            problems.push(format!("{}: in {ad} but not in {bd}", t.name));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(WeightsError::Mismatch {
        what: format!("tensor names and shapes of {ad} and {bd}"),
        count: problems.len(),
        list: problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"),
    })
}

fn combine(
    dir: Direction,
    a_dir: &Path,
    b_dir: &Path,
    out: &Path,
    opts: &JobOptions,
    progress: &dyn Progress,
) -> Result<JobReport> {
    let a = Checkpoint::open_dir(a_dir)?;
    let b = Checkpoint::open_dir(b_dir)?;
    check_pair(&a, &b)?;
    let dtype_of = |t: &TensorInfo| opts.dtype.or(t.float()).expect("checked to be a float");
    let outs: Vec<OutTensor> = b
        .tensors
        .iter()
        .map(|t| OutTensor {
            name: t.name.clone(),
            dtype: dtype_of(t).as_str().into(),
            shape: t.shape.clone(),
        })
        .collect();
    let output = AtomicOutput::dir(out)?;
    let mut writer = ShardedWriter::new(output.path(), outs, opts.max_shard_bytes, opts.verify);
    output.check_space(writer.total_bytes())?;
    let shards = crate::safetensors_io::plan_shards(writer.tensors(), opts.max_shard_bytes.max(1)).len();
    let total: u64 = writer.tensors().iter().map(OutTensor::len).sum();
    progress.start(
        match dir {
            Direction::Apply => "apply delta",
            Direction::Make => "make delta",
        },
        total,
    );
    let (mut av, mut bv) = (vec![0f32; CHUNK], vec![0f32; CHUNK]);
    let (mut scratch, mut bytes) = (Vec::new(), Vec::new());
    for tb in &b.tensors {
        let ta = a.get(&tb.name).expect("checked");
        let dt = dtype_of(tb);
        writer.begin(&tb.name)?;
        let (na, nb) = (ta.numel(), tb.numel());
        let mut start = 0;
        while start < nb {
            let n = CHUNK.min(nb - start);
            let bv = &mut bv[..n];
            b.read_f32(tb, start, bv, &mut scratch)?;
            round_to(dt, bv);
            let shared = na.saturating_sub(start).min(n);
            if shared > 0 {
                let av = &mut av[..shared];
                a.read_f32(ta, start, av, &mut scratch)?;
                round_to(dt, av);
                let bv = &mut bv[..shared];
                match dir {
                    Direction::Apply => bv.par_iter_mut().zip(av.par_iter()).for_each(|(y, x)| *y += *x),
                    Direction::Make => bv.par_iter_mut().zip(av.par_iter()).for_each(|(y, x)| *y -= *x),
                }
            }
            encode(dt, bv, &mut bytes);
            writer.write(&bytes)?;
            progress.advance(bytes.len() as u64);
            start += n;
        }
        writer.end()?;
    }
    let checksums = writer.finish()?;
    progress.finish();
    let side_files = copy_side_files(b_dir, output.path())?;
    if let Some(d) = opts.dtype {
        set_config_dtype(output.path(), d.torch_name())?;
    }
    if opts.verify {
        verify_checkpoint(output.path(), &checksums, progress)?;
    }
    output.commit()?;
    Ok(JobReport {
        tensors: b.tensors.len(),
        bytes: total,
        shards,
        verified: opts.verify,
        side_files,
    })
}
