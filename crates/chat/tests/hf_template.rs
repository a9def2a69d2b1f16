//! HF Jinja chat templates rendered as HF transformers renders them.

use std::path::PathBuf;

use serde_json::Value;
use vicugna_chat::{ChatError, ChatMessage, HfChatTemplate};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Reads a JSON file; a missing fixture fails the test rather than skipping.
fn read_json(rel: &str) -> Value {
    let path = repo_file(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Where two strings first differ, with a little context, for readable failures.
fn first_difference(expected: &str, got: &str) -> String {
    let at = expected.bytes().zip(got.bytes()).take_while(|(a, b)| a == b).count();
    let from = at.saturating_sub(40);
    let window = |s: &str| s.get(from..(at + 40).min(s.len())).unwrap_or(s).to_string();
    format!(
        "first difference at byte {at}:\n  expected …{:?}…\n  got      …{:?}…",
        window(expected),
        window(got)
    )
}

/// SmolLM2-135M-Instruct's own template reproduces HF's prompts byte for byte.
#[test]
fn smollm2_generation_cases() {
    let config = read_json("../../tests/fixtures/models/smollm2-tokenizer/tokenizer_config.json");
    let template = HfChatTemplate::from_tokenizer_config(&config).expect("template compiles");
    let golden = read_json("../../tests/fixtures/golden/smollm2-135m-instruct.json");
    let cases = golden["generation_cases"].as_array().expect("generation_cases");
    assert_eq!(cases.len(), 5);
    for (i, case) in cases.iter().enumerate() {
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let expected = case["prompt"].as_str().unwrap();
        let got = template.render(&messages, true).expect("renders");
        assert!(got == expected, "case {i}: {}", first_difference(expected, &got));
    }
}

/// A template exercising what chat templates use (namespace, slicing,
/// Python string methods, loop controls, tojson variants, `{% generation %}`,
/// `tools`, `raise_exception`), against jinja2 in HF's configuration
/// (`tests/data/make_hf_features.py`).
#[test]
fn feature_template_matches_jinja2() {
    let source = std::fs::read_to_string(repo_file("tests/data/hf_features.jinja")).unwrap();
    let template = HfChatTemplate::new(&source, "<s>", "</s>").expect("template compiles");
    let expected = read_json("tests/data/hf_features_expected.json");
    for case in expected["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let extra = serde_json::json!({ "tools": case["tools"] });
        let result = template.render_with(&messages, agp, &extra);
        match (case.get("prompt").and_then(Value::as_str), result) {
            (Some(want), Ok(got)) => {
                assert!(got == want, "{name}: {}", first_difference(want, &got))
            }
            (None, Err(ChatError::TemplateException { message })) => {
                assert_eq!(message, case["exception"].as_str().unwrap(), "{name}")
            }
            (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn raise_exception_gives_its_message() {
    let template = HfChatTemplate::new(
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System message required, got ' ~ messages[0]['role']) }}{% endif %}ok",
        "",
        "",
    )
    .unwrap();
    let err = template.render(&[ChatMessage::new("user", "Hi")], true).unwrap_err();
    match &err {
        ChatError::TemplateException { message } => {
            assert_eq!(message, "System message required, got user")
        }
        other => panic!("expected TemplateException, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "chat template raised an exception: System message required, got user"
    );
    assert_eq!(template.render(&[ChatMessage::new("system", "s")], true).unwrap(), "ok");
}

#[test]
fn syntax_and_render_errors_are_reported() {
    assert!(matches!(
        HfChatTemplate::new("{% if %}", "", ""),
        Err(ChatError::Template { .. })
    ));
    let t = HfChatTemplate::new("{{ messages | tojson(bogus=1) }}", "", "").unwrap();
    assert!(matches!(t.render(&[], false), Err(ChatError::Template { .. })));
}

#[test]
fn strftime_now_and_special_tokens() {
    let t = HfChatTemplate::new(
        "{{ bos_token }}{{ strftime_now('%Y') | length }}{{ eos_token }}",
        "<s>",
        "</s>",
    )
    .unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "<s>4</s>");
}

#[test]
fn tokenizer_config_variants() {
    // AddedToken objects and a list of named templates, as older configs have.
    let config = serde_json::json!({
        "bos_token": {"__type": "AddedToken", "content": "<s>"},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}default{{ eos_token }}"},
            {"name": "tool_use", "template": "tools"}
        ]
    });
    let t = HfChatTemplate::from_tokenizer_config(&config).unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "<s>default</s>");
    let t = HfChatTemplate::from_tokenizer_config_named(&config, Some("tool_use")).unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "tools");
    let err = HfChatTemplate::from_tokenizer_config(&serde_json::json!({})).unwrap_err();
    assert!(matches!(err, ChatError::MissingChatTemplate { name: None }));
}
