//! The tokenizer against HF transformers' own output for SmolLM2-135M-Instruct:
//! built from the HF directory, from the GGUF file's metadata, and from GGUF-style
//! metadata rebuilt out of the fixture's tokenizer.json (so the GGUF path is
//! checked even where the model file is absent).

use std::collections::HashMap;
mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use serde::Deserialize;
use vicugna_engine::tokenizer::Tokenizer;

#[derive(Deserialize)]
struct Golden {
    tokenizer_cases: Vec<TokenizerCase>,
    generation_cases: Vec<GenerationCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct GenerationCase {
    prompt: String,
    prompt_ids: Vec<u32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden() -> Golden {
    let path = fixtures().join("golden/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(&path).expect("golden file readable");
    serde_json::from_str(&text).expect("golden file parses")
}

fn hf_tokenizer() -> Tokenizer {
    Tokenizer::from_hf_dir(&fixtures().join("models/smollm2-tokenizer")).expect("HF tokenizer loads")
}

/// Every golden case encodes to HF's ids and decodes back to its text.
fn check_golden(tok: &Tokenizer, what: &str) {
    let golden = golden();
    assert!(!golden.tokenizer_cases.is_empty());
    for case in &golden.tokenizer_cases {
        let ids = tok.encode(&case.text, false).expect("encode");
        assert_eq!(ids, case.ids, "{what}: ids of {:?}", case.text);
        let text = tok.decode(&ids, false).expect("decode");
        assert_eq!(text, case.text, "{what}: decode of {:?}", case.text);
    }
    for case in &golden.generation_cases {
        // HF's `tokenizer(prompt)`: special tokens added (none for SmolLM2), and
        // `<|im_start|>` in the text is one id.
        let ids = tok.encode(&case.prompt, true).expect("encode");
        assert_eq!(ids, case.prompt_ids, "{what}: prompt ids of {:?}", case.prompt);
    }
}

/// Special ids, BOS policy and chat template agree with the HF directory's.
fn check_same_specials(tok: &Tokenizer, hf: &Tokenizer, what: &str) {
    assert_eq!(tok.bos_id(), hf.bos_id(), "{what}: bos id");
    assert_eq!(tok.eos_ids(), hf.eos_ids(), "{what}: eos ids");
    assert_eq!(tok.bos_token(), hf.bos_token(), "{what}: bos token");
    assert_eq!(tok.eos_token(), hf.eos_token(), "{what}: eos token");
    assert_eq!(tok.add_bos(), hf.add_bos(), "{what}: add_bos");
    assert_eq!(tok.chat_template(), hf.chat_template(), "{what}: chat template");
    assert_eq!(tok.vocab_size(), hf.vocab_size(), "{what}: vocab size");
    let size = u32::try_from(hf.vocab_size()).expect("vocab fits u32");
    for id in 0..size {
        assert_eq!(tok.token_str(id), hf.token_str(id), "{what}: token {id}");
    }
}

#[test]
fn hf_dir_matches_golden() {
    let tok = hf_tokenizer();
    check_golden(&tok, "HF dir");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), &[2]);
    assert!(!tok.add_bos());
}

#[test]
fn gguf_matches_golden() {
    // Fetched with pip on first use, as the program does.
    let path = common::default_gguf();
    let mut file = std::fs::File::open(&path).expect("GGUF opens");
    let content = Content::read(&mut file).expect("GGUF header parses");
    let tok = Tokenizer::from_gguf(&content, &path).expect("tokenizer from GGUF");
    check_golden(&tok, "GGUF");
    check_same_specials(&tok, &hf_tokenizer(), "GGUF");
}

/// GGUF metadata as llama.cpp writes it for the fixture's vocabulary: tokens by
/// id, merges as "left right", its added tokens as control tokens.
fn metadata_from_tokenizer_json() -> HashMap<String, Value> {
    let dir = fixtures().join("models/smollm2-tokenizer");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).expect("fixture readable"))
            .expect("fixture parses")
    };
    let tj = read("tokenizer.json");
    let config = read("tokenizer_config.json");
    let vocab = tj["model"]["vocab"].as_object().expect("vocab");
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().expect("id") as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for added in tj["added_tokens"].as_array().expect("added_tokens") {
        types[added["id"].as_u64().expect("id") as usize] = 3;
    }
    let merges: Vec<Value> = tj["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| {
            let pair = m.as_array().expect("merge pair");
            Value::String(format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()))
        })
        .collect();
    let s = |v: &str| Value::String(v.to_owned());
    HashMap::from([
        ("tokenizer.ggml.model".to_owned(), s("gpt2")),
        ("tokenizer.ggml.pre".to_owned(), s("smollm")),
        (
            "tokenizer.ggml.tokens".to_owned(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_owned(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".to_owned(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".to_owned(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".to_owned(), Value::Bool(false)),
        ("tokenizer.ggml.add_space_prefix".to_owned(), Value::Bool(false)),
        (
            "tokenizer.chat_template".to_owned(),
            s(config["chat_template"].as_str().expect("template")),
        ),
    ])
}

#[test]
fn gguf_style_metadata_matches_golden() {
    let md = metadata_from_tokenizer_json();
    let tok =
        Tokenizer::from_gguf_metadata(&md, Path::new("rebuilt-from-tokenizer.json")).expect("tokenizer from metadata");
    check_golden(&tok, "GGUF-style metadata");
    check_same_specials(&tok, &hf_tokenizer(), "GGUF-style metadata");
}
