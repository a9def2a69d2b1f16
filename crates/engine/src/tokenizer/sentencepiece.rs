//! A SentencePiece `tokenizer.model` (its protobuf) turned into the tokenizer.json
//! document HF transformers builds from it for a Llama tokenizer: BPE over the
//! pieces with byte fallback, merges derived from the scores (HF's
//! `generate_merges`), a `Metaspace` pre-tokenizer (spaces become `▁`, one is
//! prepended unless the text starts with a space; after a special token too unless
//! `legacy` is false), control pieces as special added tokens and user-defined
//! ones as plain added tokens.
//!
//! The protobuf is decoded here directly: the few fields needed are a handful of
//! varints, floats and strings.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value as Json};

use super::{added_token_json, merges_json};
use crate::error::{EngineError, Result};

/// SentencePiece piece types.
const NORMAL: u64 = 1;
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;
const BYTE: u64 = 6;

/// One vocabulary entry.
struct Piece {
    piece: String,
    score: f32,
    kind: u64,
}

/// What the converter needs from a `tokenizer.model`.
pub(super) struct SpModel {
    pieces: Vec<Piece>,
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    model_type: u64,
    byte_fallback: bool,
    unk_piece: String,
    add_dummy_prefix: bool,
}

fn bad(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::BadFile {
        path: path.into(),
        format: "SentencePiece model",
        message: message.into(),
    }
}

/// A protobuf field: its number and value.
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

/// The fields of one protobuf message, in order.
fn fields(mut b: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, String> {
    fn varint(b: &mut &[u8]) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("message ends inside a varint")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
    fn take<'a>(b: &mut &'a [u8], n: usize, number: u64) -> std::result::Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("field {number} needs {n} bytes, {} left (truncated?)", b.len()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (number, wire) = (key >> 3, key & 7);
        let f = match wire {
            0 => Field::Varint(varint(&mut b)?),
            1 => {
                take(&mut b, 8, number)?;
                Field::Fixed64
            }
            2 => {
                let n = varint(&mut b)? as usize;
                Field::Bytes(take(&mut b, n, number)?)
            }
            5 => {
                let h = take(&mut b, 4, number)?;
                Field::Fixed32(u32::from_le_bytes([h[0], h[1], h[2], h[3]]))
            }
            w => return Err(format!("field {number} has unsupported wire type {w}")),
        };
        out.push((number, f));
    }
    Ok(out)
}

impl SpModel {
    /// Decodes `tokenizer.model`.
    pub(super) fn read(path: &Path) -> Result<SpModel> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        Self::parse(&bytes).map_err(|m| bad(path, m))
    }

    fn parse(bytes: &[u8]) -> std::result::Result<SpModel, String> {
        let mut m = SpModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            unk_piece: "<unk>".into(),
            add_dummy_prefix: true,
        };
        for (number, f) in fields(bytes)? {
            match (number, f) {
                (1, Field::Bytes(b)) => {
                    let mut p = Piece {
                        piece: String::new(),
                        score: 0.0,
                        kind: NORMAL,
                    };
                    for (n, f) in fields(b).map_err(|e| format!("piece {}: {e}", m.pieces.len()))? {
                        match (n, f) {
                            (1, Field::Bytes(s)) => {
                                p.piece = String::from_utf8(s.to_vec())
                                    .map_err(|_| format!("piece {} is not UTF-8", m.pieces.len()))?
                            }
                            (2, Field::Fixed32(x)) => p.score = f32::from_bits(x),
                            (3, Field::Varint(t)) => p.kind = t,
                            _ => {}
                        }
                    }
                    m.pieces.push(p);
                }
                (2, Field::Bytes(b)) => {
                    for (n, f) in fields(b).map_err(|e| format!("trainer_spec: {e}"))? {
                        match (n, f) {
                            (3, Field::Varint(t)) => m.model_type = t,
                            (35, Field::Varint(v)) => m.byte_fallback = v != 0,
                            (45, Field::Bytes(s)) => m.unk_piece = String::from_utf8_lossy(s).into_owned(),
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    for (n, f) in fields(b).map_err(|e| format!("normalizer_spec: {e}"))? {
                        if let (3, Field::Varint(v)) = (n, f) {
                            m.add_dummy_prefix = v != 0;
                        }
                    }
                }
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            return Err("no pieces (is this a SentencePiece model?)".into());
        }
        Ok(m)
    }

    /// The tokenizer.json document HF's Llama tokenizer builds from this model.
    /// `legacy` and `add_prefix_space` are `tokenizer_config.json`'s (absent:
    /// legacy true, the model's own dummy prefix); `specials` are the config's
    /// bos/eos/unk/pad strings, which transformers registers as special tokens.
    pub(super) fn document(
        &self,
        path: &Path,
        legacy: bool,
        add_prefix_space: Option<bool>,
        specials: &[String],
    ) -> Result<Json> {
        if self.model_type != 2 {
            let kind = match self.model_type {
                1 => "unigram",
                3 => "word",
                4 => "char",
                _ => "unknown",
            };
            return Err(bad(
                path,
                format!("a {kind} model; vicugna converts BPE SentencePiece models (LLaMA's, Vicuna's) only"),
            ));
        }
        let mut vocab = Map::new();
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (i, p) in self.pieces.iter().enumerate() {
            vocab.insert(p.piece.clone(), json!(i));
            ids.insert(p.piece.as_str(), i);
        }
        let mut added: Vec<(usize, bool)> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == CONTROL || p.kind == USER_DEFINED || specials.contains(&p.piece))
            .map(|(i, p)| (i, p.kind == CONTROL || specials.contains(&p.piece)))
            .collect();
        added.sort_by_key(|&(i, special)| (i, !special));
        added.dedup_by_key(|&mut (i, _)| i);
        let added_json: Vec<Json> = added
            .iter()
            .map(|&(i, special)| added_token_json(i, &self.pieces[i].piece, special))
            .collect();

        let prefix = add_prefix_space.unwrap_or(self.add_dummy_prefix);
        let scheme = match (prefix, legacy) {
            (false, _) => "never",
            (true, true) => "always",
            (true, false) => "first",
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_json,
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false},
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": ids.contains_key(self.unk_piece.as_str()).then(|| self.unk_piece.clone()),
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": self.byte_fallback,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges_json(&self.merges(&ids)),
            },
        }))
    }

    /// HF's `generate_merges` with scores: every split of a piece into two
    /// vocabulary pieces, each piece's splits ordered by the halves' ids, then
    /// all by score, left length, right length, descending (stable sorts).
    fn merges(&self, ids: &HashMap<&str, usize>) -> Vec<(String, String)> {
        let mut merges: Vec<(&str, &str, f32)> = Vec::new();
        // Python's dict keeps a repeated piece at its first position with its last score.
        let mut score: HashMap<&str, f32> = HashMap::new();
        let mut order: Vec<&str> = Vec::new();
        for p in &self.pieces {
            if score.insert(p.piece.as_str(), p.score).is_none() {
                order.push(p.piece.as_str());
            }
        }
        for piece in order {
            let mut local: Vec<(&str, &str, f32)> = piece
                .char_indices()
                .skip(1)
                .filter_map(|(cut, _)| {
                    let (l, r) = piece.split_at(cut);
                    (ids.contains_key(l) && ids.contains_key(r)).then_some((l, r, score[piece]))
                })
                .collect();
            local.sort_by_key(|&(l, r, _)| (ids[l], ids[r]));
            merges.extend(local);
        }
        merges.sort_by(|a, b| {
            b.2.partial_cmp(&a.2)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| b.0.chars().count().cmp(&a.0.chars().count()))
                .then_with(|| b.1.chars().count().cmp(&a.1.chars().count()))
        });
        merges
            .into_iter()
            .map(|(l, r, _)| (l.to_owned(), r.to_owned()))
            .collect()
    }

    /// Pieces, scores and llama.cpp token types (1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte) for a GGUF vocabulary.
    pub(super) fn gguf_vocab(&self) -> (Vec<String>, Vec<f32>, Vec<i32>) {
        let tokens = self.pieces.iter().map(|p| p.piece.clone()).collect();
        let scores = self.pieces.iter().map(|p| p.score).collect();
        let types = self
            .pieces
            .iter()
            .map(|p| match p.kind {
                UNKNOWN | CONTROL | USER_DEFINED | BYTE => p.kind as i32,
                5 => 5,
                _ => 1,
            })
            .collect();
        (tokens, scores, types)
    }

    /// Whether the model falls back to bytes for characters it lacks.
    pub(super) fn byte_fallback(&self) -> bool {
        self.byte_fallback
    }

    /// Whether the model prepends a space (its normalizer's `add_dummy_prefix`).
    pub(super) fn add_dummy_prefix(&self) -> bool {
        self.add_dummy_prefix
    }
}
