//! vicugna-weights: offline tools over whole checkpoints — delta apply/make, LoRA
//! merge, dtype conversion, GGUF export and quantization. Every job streams tensor
//! by tensor (memory stays at a few buffers), writes to a temporary path renamed
//! into place when complete, and can re-read its output to check it.

pub mod atomic_output;
pub mod convert;
pub mod delta;
pub mod elementwise;
pub mod error;
pub mod gguf_write;
pub mod lora;
pub mod safetensors_io;

pub use error::{Result, WeightsError};
pub use safetensors_io::Float;

/// Reports progress of a long job in bytes.
pub trait Progress: Sync {
    /// A new phase of `total` bytes starts.
    fn start(&self, phase: &str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn finish(&self);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Default largest shard written, in bytes (HF's default is 5 GB as well).
pub const DEFAULT_MAX_SHARD: u64 = 5_000_000_000;

/// Parses a size like `5GB`, `500MB`, `2GiB`, `1000000`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n > 0.0).then_some((n * mult) as u64)
}

/// Elements per chunk of streamed copies.
const COPY_CHUNK: usize = 1 << 20;

/// Streams tensor `t` of `ck` into the writer (already `begin`-ed) as `dtype`, in
/// chunks; bytes are copied as they are when the dtype does not change.
pub fn copy_tensor(
    ck: &safetensors_io::Checkpoint,
    t: &safetensors_io::TensorInfo,
    dtype: Float,
    writer: &mut safetensors_io::ShardedWriter,
    progress: &dyn Progress,
) -> Result<()> {
    let n = t.numel();
    let (mut vals, mut scratch, mut bytes) = (vec![0f32; COPY_CHUNK.min(n)], Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        let k = COPY_CHUNK.min(n - start);
        if t.float() == Some(dtype) {
            bytes.resize(k * dtype.size(), 0);
            ck.read_bytes(t, (start * dtype.size()) as u64, &mut bytes)?;
        } else {
            ck.read_f32(t, start, &mut vals[..k], &mut scratch)?;
            elementwise::encode(dtype, &vals[..k], &mut bytes);
        }
        writer.write(&bytes)?;
        progress.advance(bytes.len() as u64);
        start += k;
    }
    Ok(())
}
