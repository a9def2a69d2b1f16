//! PyTorch `.bin` checkpoints (`torch.save`'s zip format), read without Python.
//!
//! A `.bin` is a zip archive: `<name>/data.pkl` is a pickle of the state dict whose
//! tensors point at storages `<name>/data/<key>`, each stored uncompressed. A pickle
//! can name any Python callable, so before the pickle is interpreted (by candle's
//! `candle_core::pickle`, which builds objects and never calls anything) every
//! global it names is checked against the few that `torch.save` writes for a state
//! dict: tensor rebuild functions, storage types and `collections.OrderedDict`.
//! Anything else is refused with the file and the name.
//!
//! Only the pickle is read into memory; tensor data stays in the file and is
//! addressed by absolute byte offset, so callers map or `pread` it like
//! safetensors data.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::DType;

use crate::error::{EngineError, Result};

/// Largest `data.pkl` read (a state dict's pickle is a few KB per tensor).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Name of a single-file PyTorch checkpoint.
pub const BIN_SINGLE: &str = "pytorch_model.bin";
/// Name of the index of a sharded PyTorch checkpoint.
pub const BIN_INDEX: &str = "pytorch_model.bin.index.json";
/// Name of a single-file safetensors checkpoint.
pub const ST_SINGLE: &str = "model.safetensors";
/// Name of the index of a sharded safetensors checkpoint.
pub const ST_INDEX: &str = "model.safetensors.index.json";

/// The globals a `torch.save`d state dict may name.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "Tensor"),
];

/// One tensor of a `.bin` file: its element type, shape, and where its bytes are.
#[derive(Clone, Debug)]
pub struct BinTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the `.bin` file.
    pub offset: u64,
    /// Bytes of data (elements × element size).
    pub len: u64,
}

fn bad(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::BadFile {
        path: path.into(),
        format: "PyTorch .bin",
        message: message.into(),
    }
}

/// Lists the tensors of a `torch.save` zip file, refusing pickles that name any
/// global other than torch's storage and rebuild functions.
pub fn read_bin(path: &Path) -> Result<Vec<BinTensor>> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    let mut magic = [0u8; 4];
    let got = (&file).read(&mut magic).map_err(|e| EngineError::io(path, e))?;
    if got < 4 || &magic != b"PK\x03\x04" {
        let message = if got >= 1 && magic[0] == 0x80 {
            "the legacy torch.save format (before torch 1.6) is not supported; re-save it with a newer torch"
        } else {
            "not a zip archive (torch.save's format since torch 1.6)"
        };
        return Err(bad(path, message));
    }
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(path, format!("reading the zip directory: {e} (truncated file?)")))?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_owned)
        .ok_or_else(|| bad(path, "no data.pkl in the archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let pickle = {
        let entry = zip
            .by_name(&pkl_name)
            .map_err(|e| bad(path, format!("{pkl_name}: {e}")))?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(bad(
                path,
                format!("{pkl_name} is {} bytes, more than {MAX_PICKLE_BYTES}", entry.size()),
            ));
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| bad(path, format!("reading {pkl_name}: {e} (truncated file?)")))?;
        buf
    };
    check_globals(&pickle).map_err(|m| bad(path, format!("{pkl_name}: {m}")))?;
    let mut stack = Stack::empty();
    let mut reader = std::io::Cursor::new(&pickle[..]);
    stack
        .read_loop(&mut reader)
        .map_err(|e| bad(path, format!("{pkl_name}: {e}")))?;
    let root = stack.finalize().map_err(|e| bad(path, format!("{pkl_name}: {e}")))?;
    let Object::Dict(entries) = root else {
        return Err(bad(
            path,
            format!("{pkl_name} does not hold a state dict (a dict of name -> tensor)"),
        ));
    };

    // Where each storage's bytes are, looked up once per storage (tied or shared
    // tensors point at the same one).
    let mut storages: HashMap<String, (u64, u64)> = HashMap::new();
    let mut out = Vec::new();
    for (key, value) in entries {
        let Object::Unicode(name) = key else { continue };
        let Some(t) = tensor_of(value) else {
            // torch's `_metadata` and any other non-tensor entry.
            continue;
        };
        let t = t.map_err(|m| EngineError::BadTensor {
            path: path.into(),
            tensor: name.clone(),
            message: m,
        })?;
        let bad_t = |message: String| EngineError::BadTensor {
            path: path.into(),
            tensor: name.clone(),
            message,
        };
        let entry_name = format!("{prefix}data/{}", t.storage_key);
        let (data_start, entry_len) = match storages.get(&entry_name) {
            Some(&v) => v,
            None => {
                let entry = zip
                    .by_name(&entry_name)
                    .map_err(|e| bad_t(format!("its storage {entry_name}: {e}")))?;
                if entry.compression() != zip::CompressionMethod::Stored {
                    return Err(bad_t(format!(
                        "its storage {entry_name} is compressed ({:?}); torch.save stores data uncompressed",
                        entry.compression()
                    )));
                }
                let v = (entry.data_start(), entry.size());
                storages.insert(entry_name.clone(), v);
                v
            }
        };
        let elem = t.dtype.size_in_bytes() as u64;
        let numel: u64 = t.shape.iter().map(|&d| d as u64).product();
        let len = numel * elem;
        let start = t.offset * elem;
        if start + len > entry_len {
            return Err(bad_t(format!(
                "needs bytes {start}..{} of its storage {entry_name}, which has {entry_len}",
                start + len
            )));
        }
        let offset = data_start + start;
        if offset + len > file_len {
            return Err(bad_t(format!(
                "its data ends at byte {} but the file has {file_len} (truncated?)",
                offset + len
            )));
        }
        out.push(BinTensor {
            name,
            dtype: t.dtype,
            shape: t.shape,
            offset,
            len,
        });
    }
    Ok(out)
}

/// What a pickled tensor says about itself.
struct PickledTensor {
    dtype: DType,
    shape: Vec<usize>,
    /// Element offset into the storage.
    offset: u64,
    storage_key: String,
}

/// The tensor a state-dict value describes: `None` when it is no tensor at all,
/// an error when it is one vicugna cannot use.
fn tensor_of(value: Object) -> Option<std::result::Result<PickledTensor, String>> {
    let Object::Reduce { callable, args } = value else {
        return None;
    };
    let (module, class) = match *callable {
        Object::Class {
            ref module_name,
            ref class_name,
        } => (module_name.clone(), class_name.clone()),
        _ => return None,
    };
    let args = match (module.as_str(), class.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") => *args,
        // nn.Parameter(tensor, requires_grad, hooks): the tensor is its first argument.
        ("torch._utils", "_rebuild_parameter") => match *args {
            Object::Tuple(mut a) if !a.is_empty() => match a.remove(0) {
                Object::Reduce { callable, args } if is_class(&callable, "torch._utils", "_rebuild_tensor_v2") => *args,
                _ => return Some(Err("a parameter that does not wrap a plain tensor".into())),
            },
            _ => return Some(Err("a parameter without arguments".into())),
        },
        // Tensor subclass: (func, type, args, state); the plain tensor is func(*args).
        ("torch._tensor", "_rebuild_from_type_v2") => match *args {
            Object::Tuple(a) if a.len() >= 3 && is_class(&a[0], "torch._utils", "_rebuild_tensor_v2") => {
                a.into_iter().nth(2).unwrap_or(Object::None)
            }
            _ => return Some(Err("a tensor subclass vicugna cannot rebuild".into())),
        },
        _ => return None,
    };
    Some(rebuild_args(args))
}

fn is_class(o: &Object, module: &str, class: &str) -> bool {
    matches!(o, Object::Class { module_name, class_name } if module_name == module && class_name == class)
}

fn int(o: &Object) -> Option<i64> {
    match o {
        Object::Int(i) => Some(i64::from(*i)),
        Object::Long(i) => Some(*i),
        _ => None,
    }
}

fn ints(o: &Object) -> Option<Vec<usize>> {
    match o {
        Object::Tuple(v) => v.iter().map(|x| int(x).and_then(|i| usize::try_from(i).ok())).collect(),
        _ => None,
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)`.
fn rebuild_args(args: Object) -> std::result::Result<PickledTensor, String> {
    let Object::Tuple(a) = args else {
        return Err("tensor arguments are not a tuple".into());
    };
    if a.len() < 4 {
        return Err(format!("tensor has {} arguments, expected at least 4", a.len()));
    }
    let Object::PersistentLoad(storage) = &a[0] else {
        return Err("tensor does not refer to a storage".into());
    };
    // ('storage', torch.FloatStorage, key, location, numel)
    let Object::Tuple(s) = storage.as_ref() else {
        return Err("storage reference is not a tuple".into());
    };
    let (storage_type, key) = match (s.get(1), s.get(2)) {
        (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) => (class_name.as_str(), key.clone()),
        _ => return Err("storage reference is not (kind, type, key, location, size)".into()),
    };
    let dtype = match storage_type {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ByteStorage" => DType::U8,
        other => return Err(format!("storage type {other} is not supported")),
    };
    let offset = int(&a[1])
        .and_then(|o| u64::try_from(o).ok())
        .ok_or("storage offset is not a non-negative integer")?;
    let shape = ints(&a[2]).ok_or("size is not a tuple of non-negative integers")?;
    let stride = ints(&a[3]).ok_or("stride is not a tuple of non-negative integers")?;
    if stride.len() != shape.len() {
        return Err(format!("size {shape:?} and stride {stride:?} differ in rank"));
    }
    // Row-major strides; a dimension of size 1 may carry any stride.
    let mut expect = 1usize;
    for (d, (&n, &st)) in shape.iter().zip(&stride).enumerate().rev() {
        if n != 1 && st != expect {
            return Err(format!(
                "not stored contiguously (size {shape:?}, stride {stride:?}, dimension {d}); \
                 re-save it after .contiguous()"
            ));
        }
        expect *= n;
    }
    Ok(PickledTensor {
        dtype,
        shape,
        offset,
        storage_key: key,
    })
}

/// Walks the pickle's opcodes (those candle's reader knows; any other is refused)
/// and checks every global it names against [`ALLOWED_GLOBALS`], and that every
/// length stays inside the pickle.
fn check_globals(p: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0usize;
    let need = |i: usize, n: usize| -> std::result::Result<(), String> {
        if i + n > p.len() {
            Err(format!("pickle ends inside an opcode at byte {i} (truncated?)"))
        } else {
            Ok(())
        }
    };
    let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]) as usize;
    loop {
        need(i, 1)?;
        let op = p[i];
        i += 1;
        let arg = match op {
            b'.' => return Ok(()),
            0x80 | b'q' | b'h' | b'K' => 1,
            b'M' => 2,
            b'r' | b'j' | b'J' => 4,
            b'G' => 8,
            0x8a => {
                need(i, 1)?;
                1 + p[i] as usize
            }
            b'X' => {
                need(i, 4)?;
                4 + u32_at(i)
            }
            b'c' => {
                let mut parts = [String::new(), String::new()];
                for part in &mut parts {
                    let end = p[i..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("pickle ends inside a global name (truncated?)")?;
                    *part = String::from_utf8_lossy(&p[i..i + end]).into_owned();
                    i += end + 1;
                }
                let [module, name] = parts;
                if !ALLOWED_GLOBALS.iter().any(|&(m, n)| m == module && n == name) {
                    return Err(format!(
                        "refusing the global `{module}.{name}`: a state dict names only torch's \
                         tensor and storage types and collections.OrderedDict (a .bin file can \
                         carry code; this one is not a plain checkpoint)"
                    ));
                }
                0
            }
            b')' | b'R' | b'(' | b't' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b'N' | b's' | b'u' | b'}' | b'd'
            | b'b' | 0x81 | b']' | b'a' | b'e' => 0,
            other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", i - 1)),
        };
        need(i, arg)?;
        i += arg;
    }
}

/// Every tensor of a (small) `.bin` file, loaded into memory: for adapters.
pub fn load_bin(path: &Path, device: &candle_core::Device) -> Result<HashMap<String, candle_core::Tensor>> {
    let tensors = read_bin(path)?;
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut out = HashMap::new();
    for t in tensors {
        let mut buf = vec![0u8; t.len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, t.offset).map_err(|e| EngineError::BadTensor {
            path: path.into(),
            tensor: t.name.clone(),
            message: format!("reading its data: {e} (truncated file?)"),
        })?;
        let tensor = candle_core::Tensor::from_raw_buffer(&buf, t.dtype, &t.shape, device)?;
        out.insert(t.name, tensor);
    }
    Ok(out)
}

/// The weight files of an HF model directory.
#[derive(Clone, Debug)]
pub enum WeightFiles {
    /// `model.safetensors` or the shards of `model.safetensors.index.json`.
    Safetensors(Vec<PathBuf>),
    /// `pytorch_model.bin` or the shards of `pytorch_model.bin.index.json`.
    Bin(Vec<PathBuf>),
}

impl WeightFiles {
    /// The files, in shard order.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            WeightFiles::Safetensors(p) | WeightFiles::Bin(p) => p,
        }
    }
}

/// Finds the weight files of an HF model directory: safetensors when there are
/// any, else PyTorch `.bin`. Every shard an index lists must exist.
pub fn find_weight_files(dir: &Path) -> Result<WeightFiles> {
    let sharded = |index: PathBuf| -> Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::BadJson {
            path: index.clone(),
            message: e.to_string(),
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::BadConfig {
                path: index.clone(),
                field: "weight_map".into(),
                message: "missing; expected an object of tensor name -> shard file".into(),
            })?;
        let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        let mut paths = Vec::new();
        for s in shards {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(EngineError::MissingFile {
                    path: p,
                    what: format!("weight shard listed in {}", index.display()),
                });
            }
            paths.push(p);
        }
        Ok(paths)
    };
    if dir.join(ST_SINGLE).is_file() {
        return Ok(WeightFiles::Safetensors(vec![dir.join(ST_SINGLE)]));
    }
    if dir.join(ST_INDEX).is_file() {
        return Ok(WeightFiles::Safetensors(sharded(dir.join(ST_INDEX))?));
    }
    if dir.join(BIN_SINGLE).is_file() {
        return Ok(WeightFiles::Bin(vec![dir.join(BIN_SINGLE)]));
    }
    if dir.join(BIN_INDEX).is_file() {
        return Ok(WeightFiles::Bin(sharded(dir.join(BIN_INDEX))?));
    }
    Err(EngineError::MissingFile {
        path: dir.join(ST_SINGLE),
        what: format!(
            "no weights in the model directory: expected {ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_globals_are_refused() {
        // GLOBAL os system, then STOP.
        let p = b"\x80\x02cos\nsystem\n.";
        let e = check_globals(p).unwrap_err();
        assert!(e.contains("`os.system`"), "{e}");
        assert!(check_globals(b"\x80\x02ccollections\nOrderedDict\n).").is_ok());
    }

    #[test]
    fn lengths_past_the_end_are_refused() {
        let e = check_globals(b"\x80\x02X\xff\xff\xff\x7fab").unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
