//! A streaming GGUF (v3) writer. candle's `gguf_file::write` needs every tensor in
//! memory at once; this one takes the tensor list up front (names, shapes, types
//! and so sizes are known before any data) and then one tensor's bytes at a time.
//! The layout is candle's and llama.cpp's: header, metadata, tensor infos, data
//! aligned to 32 bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;

use crate::error::{Result, WeightsError};

const ALIGN: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

/// GGUF type id of a ggml dtype (llama.cpp's `ggml_type`).
pub fn ggml_type_id(d: GgmlDType) -> u32 {
    match d {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A tensor to be written: GGUF name, shape in row-major (HF) order, type.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl GgufTensor {
    /// Bytes of its data.
    pub fn len(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        (n / self.dtype.block_size() * self.dtype.type_size()) as u64
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes a GGUF file: metadata and tensor table first, then tensors in order.
pub struct GgufWriter {
    path: PathBuf,
    w: BufWriter<File>,
    tensors: Vec<GgufTensor>,
    next: usize,
    remaining: u64,
    total: u64,
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_meta(w: &mut impl Write, v: &Meta) -> std::io::Result<()> {
    // Value type ids: u32 4, i32 5, f32 6, bool 7, string 8, array 9.
    match v {
        Meta::U32(x) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::I32(x) => {
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::F32(x) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::Bool(x) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[*x as u8])
        }
        Meta::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            put_str(w, s)
        }
        Meta::Strs(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&8u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| put_str(w, s))
        }
        Meta::I32s(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Meta::F32s(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

fn io_err(path: &Path, e: std::io::Error, total: u64) -> WeightsError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        WeightsError::DiskFull {
            path: path.into(),
            needed: total,
        }
    } else {
        WeightsError::io(path, e)
    }
}

impl GgufWriter {
    /// Creates `path` and writes the header, metadata and tensor table.
    pub fn create(path: &Path, metadata: &[(String, Meta)], tensors: Vec<GgufTensor>) -> Result<Self> {
        let total: u64 = tensors.iter().map(|t| t.len().div_ceil(ALIGN) * ALIGN).sum();
        let file = File::create(path).map_err(|e| io_err(path, e, total))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut head = Vec::new();
        let build = |head: &mut Vec<u8>| -> std::io::Result<()> {
            head.write_all(b"GGUF")?;
            head.write_all(&3u32.to_le_bytes())?;
            head.write_all(&(tensors.len() as u64).to_le_bytes())?;
            head.write_all(&(metadata.len() as u64).to_le_bytes())?;
            for (k, v) in metadata {
                put_str(head, k)?;
                put_meta(head, v)?;
            }
            let mut offset = 0u64;
            for t in &tensors {
                put_str(head, &t.name)?;
                head.write_all(&(t.shape.len() as u32).to_le_bytes())?;
                for &d in t.shape.iter().rev() {
                    head.write_all(&(d as u64).to_le_bytes())?;
                }
                head.write_all(&ggml_type_id(t.dtype).to_le_bytes())?;
                head.write_all(&offset.to_le_bytes())?;
                offset += t.len().div_ceil(ALIGN) * ALIGN;
            }
            let pad = (ALIGN - head.len() as u64 % ALIGN) % ALIGN;
            head.extend(std::iter::repeat_n(0u8, pad as usize));
            Ok(())
        };
        build(&mut head).map_err(|e| io_err(path, e, total))?;
        w.write_all(&head).map_err(|e| io_err(path, e, total))?;
        Ok(GgufWriter {
            path: path.into(),
            w,
            tensors,
            next: 0,
            remaining: 0,
            total,
        })
    }

    /// The tensors in writing order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    /// Starts the next tensor, which must be `name`.
    pub fn begin(&mut self, name: &str) -> Result<()> {
        let t = &self.tensors[self.next];
        assert_eq!(t.name, name, "tensors must be written in the planned order");
        self.remaining = t.len();
        Ok(())
    }

    /// Appends bytes of the current tensor.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if data.len() as u64 > self.remaining {
            return Err(WeightsError::Unsupported(format!(
                "internal: more bytes than tensor {} holds",
                self.tensors[self.next].name
            )));
        }
        self.remaining -= data.len() as u64;
        let (path, total) = (self.path.clone(), self.total);
        self.w.write_all(data).map_err(|e| io_err(&path, e, total))
    }

    /// Ends the current tensor (pads to the alignment).
    pub fn end(&mut self) -> Result<()> {
        let t = &self.tensors[self.next];
        if self.remaining != 0 {
            return Err(WeightsError::Unsupported(format!(
                "internal: tensor {} ended {} bytes short",
                t.name, self.remaining
            )));
        }
        let pad = (t.len().div_ceil(ALIGN) * ALIGN - t.len()) as usize;
        let (path, total) = (self.path.clone(), self.total);
        self.w
            .write_all(&[0u8; ALIGN as usize][..pad])
            .map_err(|e| io_err(&path, e, total))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs the file.
    pub fn finish(self) -> Result<()> {
        assert_eq!(self.next, self.tensors.len(), "not every planned tensor was written");
        let (path, total) = (self.path.clone(), self.total);
        let file = self.w.into_inner().map_err(|e| io_err(&path, e.into_error(), total))?;
        file.sync_all().map_err(|e| io_err(&path, e, total))
    }
}
