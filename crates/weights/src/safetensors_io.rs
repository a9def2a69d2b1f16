//! Streaming access to HF safetensors checkpoints, single-file or sharded.
//!
//! The `safetensors` crate parses a header only from a buffer holding the whole
//! file, and serializes only from tensors held in memory; a streaming job needs
//! neither, so the (small, documented) format is read and written here directly:
//! an 8-byte little-endian header length, a JSON header of
//! `name -> {dtype, shape, data_offsets}`, then the tensor bytes.
//! Reads use `pread` into small reusable buffers (no mmap), so resident memory
//! stays at a few buffers whatever the model size.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use candle_core::DType;
use vicugna_engine::torch_bin::WeightFiles;

use crate::error::{Result, WeightsError};

/// Name of the index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Element types the tools compute with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Float {
    F32,
    F16,
    BF16,
}

impl Float {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::BF16 => 2,
        }
    }

    /// The safetensors dtype string.
    pub fn as_str(self) -> &'static str {
        match self {
            Float::F32 => "F32",
            Float::F16 => "F16",
            Float::BF16 => "BF16",
        }
    }

    /// The name HF configs use (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Float::F32 => "float32",
            Float::F16 => "float16",
            Float::BF16 => "bfloat16",
        }
    }

    /// Parses `f32`, `f16`, `bf16` (also `float16`, `bfloat16`, `float32`, any case).
    pub fn parse(s: &str) -> Option<Float> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Some(Float::F32),
            "f16" | "float16" | "half" => Some(Float::F16),
            "bf16" | "bfloat16" => Some(Float::BF16),
            _ => None,
        }
    }
}

/// Bytes per element of a safetensors dtype string.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// One tensor of a checkpoint: where its bytes are.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// safetensors dtype string (`F16`, `BF16`, `F32`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Index of the file in [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte offset of the data in its file.
    pub offset: u64,
    pub len: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The dtype, when it is one the tools compute with.
    pub fn float(&self) -> Option<Float> {
        match self.dtype.as_str() {
            "F32" => Some(Float::F32),
            "F16" => Some(Float::F16),
            "BF16" => Some(Float::BF16),
            _ => None,
        }
    }
}

/// The weight files of an HF-layout model directory, opened for reading.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<(PathBuf, File)>,
    /// Tensors in file order, then data order (sequential reads).
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`,
    /// or else PyTorch's `pytorch_model.bin` or the shards of its index.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(WeightsError::MissingFile {
                path: dir.into(),
                what: "not a directory (expected an HF-layout model directory)".into(),
            });
        }
        match vicugna_engine::torch_bin::find_weight_files(dir)? {
            WeightFiles::Safetensors(paths) => Self::open_files(dir, &paths),
            WeightFiles::Bin(paths) => Self::open_bin_files(dir, &paths),
        }
    }

    /// Opens PyTorch `.bin` files (torch.save's zip format) as one checkpoint: the
    /// pickles are checked and read, the data is read in place like safetensors'.
    pub fn open_bin_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mut infos = vicugna_engine::torch_bin::read_bin(path)?;
            infos.sort_by_key(|t| t.offset);
            let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
            for t in infos {
                let dtype = match t.dtype {
                    DType::F32 => "F32",
                    DType::F16 => "F16",
                    DType::BF16 => "BF16",
                    DType::F64 => "F64",
                    DType::I64 => "I64",
                    DType::I32 => "I32",
                    DType::U8 => "U8",
                    other => {
                        return Err(WeightsError::BadTensor {
                            path: path.clone(),
                            tensor: t.name,
                            message: format!("dtype {other:?} is not supported"),
                        })
                    }
                };
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(WeightsError::BadTensor {
                        path: path.clone(),
                        tensor: t.name,
                        message: "appears in more than one shard".into(),
                    });
                }
                tensors.push(TensorInfo {
                    name: t.name,
                    dtype: dtype.into(),
                    shape: t.shape,
                    file: i,
                    offset: t.offset,
                    len: t.len,
                });
            }
            files.push((path.clone(), file));
        }
        Ok(Checkpoint {
            dir: dir.into(),
            files,
            tensors,
            by_name,
        })
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| WeightsError::io(path, e))?;
            let mut infos = read_header(path, &file)?;
            infos.sort_by_key(|t| t.offset);
            for mut t in infos {
                t.file = i;
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(WeightsError::BadTensor {
                        path: path.clone(),
                        tensor: t.name,
                        message: "appears in more than one shard".into(),
                    });
                }
                tensors.push(t);
            }
            files.push((path.clone(), file));
        }
        Ok(Checkpoint {
            dir: dir.into(),
            files,
            tensors,
            by_name,
        })
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The file holding a tensor.
    pub fn path_of(&self, t: &TensorInfo) -> &Path {
        &self.files[t.file].0
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Reads `buf.len()` bytes of tensor `t` starting `start` bytes into its data.
    pub fn read_bytes(&self, t: &TensorInfo, start: u64, buf: &mut [u8]) -> Result<()> {
        let (path, file) = &self.files[t.file];
        file.read_exact_at(buf, t.offset + start)
            .map_err(|e| WeightsError::BadTensor {
                path: path.clone(),
                tensor: t.name.clone(),
                message: format!("reading its data: {e} (truncated file?)"),
            })
    }

    /// Reads `out.len()` elements of `t`, from element `start`, as f32.
    pub fn read_f32(&self, t: &TensorInfo, start: usize, out: &mut [f32], scratch: &mut Vec<u8>) -> Result<()> {
        let float = t.float().ok_or_else(|| WeightsError::BadTensor {
            path: self.path_of(t).into(),
            tensor: t.name.clone(),
            message: format!("dtype {} is not a float type (f32, f16, bf16)", t.dtype),
        })?;
        let size = float.size();
        scratch.resize(out.len() * size, 0);
        self.read_bytes(t, (start * size) as u64, scratch)?;
        crate::elementwise::decode(float, scratch, out);
        Ok(())
    }

    /// The whole tensor as f32 (for jobs that need a tensor at once, like a matmul).
    pub fn read_all_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; t.numel()];
        let mut scratch = Vec::new();
        self.read_f32(t, 0, &mut out, &mut scratch)?;
        Ok(out)
    }
}

fn read_header(path: &Path, file: &File) -> Result<Vec<TensorInfo>> {
    let bad = |message: String| WeightsError::BadFile {
        path: path.into(),
        format: "safetensors",
        message,
    };
    let file_len = file.metadata().map_err(|e| WeightsError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0)
        .map_err(|_| bad(format!("{file_len} bytes is too short for a header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!(
            "header length {header_len} does not fit the file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let json: BTreeMap<String, Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + header_len;
    let mut infos = Vec::new();
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad_t = |message: String| WeightsError::BadTensor {
            path: path.into(),
            tensor: name.clone(),
            message,
        };
        let dtype = v
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_t("header entry has no dtype".into()))?
            .to_string();
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad_t("header entry has no shape list".into()))?;
        let offs: Vec<u64> = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad_t("header entry has no valid data_offsets [begin, end]".into()))?;
        let size = dtype_size(&dtype).ok_or_else(|| bad_t(format!("unknown dtype {dtype}")))?;
        let len = offs[1] - offs[0];
        let numel: usize = shape.iter().product();
        if len != (numel * size) as u64 {
            return Err(bad_t(format!(
                "shape {shape:?} of {dtype} needs {} bytes but data_offsets span {len}",
                numel * size
            )));
        }
        if data_start + offs[1] > file_len {
            return Err(bad_t(format!(
                "data ends at byte {} but the file has {file_len} (truncated?)",
                data_start + offs[1]
            )));
        }
        infos.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            file: 0,
            offset: data_start + offs[0],
            len,
        });
    }
    Ok(infos)
}

/// A tensor the writer will write.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl OutTensor {
    /// Bytes of its data.
    pub fn len(&self) -> u64 {
        (self.shape.iter().product::<usize>() * dtype_size(&self.dtype).unwrap_or(1)) as u64
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Splits tensors, in order, into shards of at most `max_bytes` each (a tensor
/// larger than that gets a shard of its own), as HF's `save_pretrained` does.
pub fn plan_shards(tensors: &[OutTensor], max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let len = t.len();
        match shards.last_mut() {
            Some(last) if size + len <= max_bytes => {
                last.push(i);
                size += len;
            }
            _ => {
                shards.push(vec![i]);
                size = len;
            }
        }
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

/// SHA-256 of one written tensor's bytes.
#[derive(Clone, Debug)]
pub struct TensorChecksum {
    pub name: String,
    pub sha256: [u8; 32],
}

/// Writes a checkpoint into a directory, tensor by tensor, in the order given,
/// sharded with `model.safetensors.index.json` when there is more than one shard.
pub struct ShardedWriter {
    dir: PathBuf,
    tensors: Vec<OutTensor>,
    shards: Vec<Vec<usize>>,
    shard_names: Vec<String>,
    /// Index of the next tensor to write.
    next: usize,
    shard: usize,
    out: Option<(PathBuf, BufWriter<File>)>,
    /// Bytes still expected for the tensor being written.
    remaining: u64,
    hasher: Option<Sha256>,
    checksums: Vec<TensorChecksum>,
    total: u64,
}

impl ShardedWriter {
    /// Plans the shards; `hash` records a SHA-256 per tensor for `--verify`.
    pub fn new(dir: &Path, tensors: Vec<OutTensor>, max_shard_bytes: u64, hash: bool) -> Self {
        let shards = plan_shards(&tensors, max_shard_bytes.max(1));
        let n = shards.len();
        let shard_names = if n == 1 {
            vec![SINGLE_FILE.to_string()]
        } else {
            (1..=n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect()
        };
        let total = tensors.iter().map(OutTensor::len).sum();
        ShardedWriter {
            dir: dir.into(),
            tensors,
            shards,
            shard_names,
            next: 0,
            shard: 0,
            out: None,
            remaining: 0,
            hasher: hash.then(Sha256::new),
            checksums: Vec::new(),
            total,
        }
    }

    /// Bytes of tensor data plus headers that will be written.
    pub fn total_bytes(&self) -> u64 {
        self.total + 4096 * self.shards.len() as u64
    }

    /// The tensors in writing order.
    pub fn tensors(&self) -> &[OutTensor] {
        &self.tensors
    }

    fn io_err(&self, path: &Path, e: std::io::Error) -> WeightsError {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull {
            WeightsError::DiskFull {
                path: path.into(),
                needed: self.total_bytes(),
            }
        } else {
            WeightsError::io(path, e)
        }
    }

    fn open_shard(&mut self) -> Result<()> {
        let path = self.dir.join(&self.shard_names[self.shard]);
        let file = File::create(&path).map_err(|e| self.io_err(&path, e))?;
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for &i in &self.shards[self.shard] {
            let t = &self.tensors[i];
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.len()]}),
            );
            off += t.len();
        }
        let mut bytes = serde_json::to_vec(&Value::Object(header)).expect("a JSON map serializes");
        // The data that follows starts 8-byte aligned, as the format recommends.
        while !bytes.len().is_multiple_of(8) {
            bytes.push(b' ');
        }
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(&bytes))
            .map_err(|e| self.io_err(&path, e))?;
        self.out = Some((path, w));
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((path, w)) = self.out.take() {
            let file = w.into_inner().map_err(|e| self.io_err(&path, e.into_error()))?;
            file.sync_all().map_err(|e| self.io_err(&path, e))?;
        }
        Ok(())
    }

    /// Starts the next tensor, which must be `name`.
    pub fn begin(&mut self, name: &str) -> Result<()> {
        let t = self.tensors.get(self.next).ok_or_else(|| {
            WeightsError::Unsupported(format!("internal: tensor {name} written after the last planned one"))
        })?;
        assert_eq!(t.name, name, "tensors must be written in the planned order");
        self.remaining = t.len();
        while !self.shards[self.shard].contains(&self.next) {
            self.close_shard()?;
            self.shard += 1;
        }
        if self.out.is_none() {
            self.open_shard()?;
        }
        if let Some(h) = self.hasher.as_mut() {
            *h = Sha256::new();
        }
        Ok(())
    }

    /// Appends bytes of the current tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        assert!(bytes.len() as u64 <= self.remaining, "more bytes than the tensor holds");
        self.remaining -= bytes.len() as u64;
        if let Some(h) = self.hasher.as_mut() {
            h.update(bytes);
        }
        let (path, w) = self.out.as_mut().expect("begin() opens a shard");
        if let Err(e) = w.write_all(bytes) {
            let path = path.clone();
            return Err(self.io_err(&path, e));
        }
        Ok(())
    }

    /// Ends the current tensor.
    pub fn end(&mut self) -> Result<()> {
        assert_eq!(self.remaining, 0, "tensor ended before all its bytes were written");
        let name = self.tensors[self.next].name.clone();
        if let Some(h) = self.hasher.as_mut() {
            let sha256 = std::mem::take(h).finalize().into();
            self.checksums.push(TensorChecksum { name, sha256 });
        }
        self.next += 1;
        Ok(())
    }

    /// Closes the last shard, writes the index when sharded, and returns the checksums.
    pub fn finish(mut self) -> Result<Vec<TensorChecksum>> {
        assert_eq!(self.next, self.tensors.len(), "not every planned tensor was written");
        if self.out.is_none() {
            self.open_shard()?;
        }
        self.close_shard()?;
        if self.shards.len() > 1 {
            let mut map = serde_json::Map::new();
            for (s, idx) in self.shards.iter().enumerate() {
                for &i in idx {
                    map.insert(self.tensors[i].name.clone(), json!(self.shard_names[s]));
                }
            }
            let index = json!({"metadata": {"total_size": self.total}, "weight_map": map});
            let path = self.dir.join(INDEX_FILE);
            let text = serde_json::to_string_pretty(&index).expect("a JSON value serializes");
            std::fs::write(&path, text + "\n").map_err(|e| self.io_err(&path, e))?;
        }
        Ok(self.checksums)
    }
}

/// Re-reads a written checkpoint from disk (past the page cache where the kernel
/// allows) and compares every tensor's SHA-256 with what was written.
pub fn verify_checkpoint(dir: &Path, expected: &[TensorChecksum], progress: &dyn crate::Progress) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| WeightsError::io(dir, e))? {
        let path = entry.map_err(|e| WeightsError::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            drop_page_cache(&path);
        }
    }
    let ck = Checkpoint::open_dir(dir)?;
    if ck.tensors.len() != expected.len() {
        return Err(WeightsError::Verify(format!(
            "{} holds {} tensors, {} were written",
            dir.display(),
            ck.tensors.len(),
            expected.len()
        )));
    }
    progress.start("verify", ck.total_bytes());
    let mut buf = vec![0u8; 4 << 20];
    for want in expected {
        let t = ck
            .get(&want.name)
            .ok_or_else(|| WeightsError::Verify(format!("{}: tensor {} is missing", dir.display(), want.name)))?;
        let mut h = Sha256::new();
        let mut pos = 0u64;
        while pos < t.len {
            let n = (t.len - pos).min(buf.len() as u64) as usize;
            ck.read_bytes(t, pos, &mut buf[..n])?;
            h.update(&buf[..n]);
            pos += n as u64;
            progress.advance(n as u64);
        }
        let got: [u8; 32] = h.finalize().into();
        if got != want.sha256 {
            return Err(WeightsError::Verify(format!(
                "{}: tensor {}: checksum on disk differs from the bytes written",
                ck.path_of(t).display(),
                want.name
            )));
        }
    }
    progress.finish();
    Ok(())
}

/// Asks the kernel to forget cached pages of a (synced) file, so that the next
/// read comes from the disk.
pub fn drop_page_cache(path: &Path) {
    if let Ok(f) = File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open descriptor; failure only means the cache stays.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}
