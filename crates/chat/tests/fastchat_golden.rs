//! FastChat 0.2.36 golden prompts: every case in
//! `tests/fixtures/golden/fastchat-templates.json` (78 templates × 4
//! conversations × with/without a system message) must render byte for byte,
//! with the template's stop string, stop ids, style and roles.

use std::path::PathBuf;

use serde_json::Value;
use vicugna_chat::{get_template, render_messages, template_names, ChatMessage, Conversation};

/// Reads a golden file from the repository's fixtures; a missing file fails.
fn golden(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/golden")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden file is JSON")
}

/// Where two strings first differ, with some context: long system prompts
/// make whole-prompt dumps unreadable.
fn first_difference(expected: &str, got: &str) -> String {
    let at = expected.chars().zip(got.chars()).take_while(|(a, b)| a == b).count();
    let window = |s: &str| s.chars().skip(at.saturating_sub(40)).take(80).collect::<String>();
    format!(
        "differs at char {at} (lengths {} vs {}):\n  expected …{:?}…\n  got      …{:?}…",
        expected.chars().count(),
        got.chars().count(),
        window(expected),
        window(got)
    )
}

/// Everything we produce for one case, in the golden file's JSON shapes.
fn ours(case: &Value) -> Result<Value, String> {
    let name = case["template"].as_str().unwrap();
    let system = case["system_message"].as_str();
    let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).map_err(|e| e.to_string())?;
    let prompt = render_messages(name, &messages, system).map_err(|e| e.to_string())?;
    let conv = get_template(name).ok_or("no template")?;
    Ok(serde_json::json!({
        "prompt": prompt,
        "stop_str": conv.stop_str,
        "stop_token_ids": conv.stop_token_ids,
        "sep_style": conv.sep_style.name(),
        "roles": conv.roles,
    }))
}

#[test]
fn all_fastchat_golden_cases() {
    let golden = golden("fastchat-templates.json");
    let cases = golden["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 624, "the golden file should hold 624 cases");

    let mut failures = Vec::new();
    for case in cases {
        let got = match ours(case) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{} / {}: error {e}", case["template"], case["conversation"]));
                continue;
            }
        };
        for field in ["prompt", "stop_str", "stop_token_ids", "sep_style", "roles"] {
            if got[field] != case[field] {
                let detail = match (case[field].as_str(), got[field].as_str()) {
                    (Some(want), Some(have)) => first_difference(want, have),
                    _ => format!("\n  expected {}\n  got      {}", case[field], got[field]),
                };
                failures.push(format!(
                    "{} / {} / system={}: {field} {detail}",
                    case["template"], case["conversation"], case["system_message"]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden cases failed; first ones:\n{}",
        failures.len(),
        cases.len(),
        failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn every_golden_template_is_built_in() {
    let golden = golden("fastchat-templates.json");
    let names = template_names();
    let mut golden_names: Vec<&str> = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["template"].as_str().unwrap())
        .collect();
    golden_names.dedup();
    assert_eq!(golden_names.len(), 78);
    for n in golden_names {
        assert!(names.contains(&n), "missing template {n}");
    }
}

/// The same prompts through the lower-level API (append_message with role
/// strings), as the CLI's chat loop builds them.
#[test]
fn append_message_api_matches_render_messages() {
    let mut conv = Conversation::from_template("vicuna_v1.1").unwrap();
    conv.append_message(conv.user_role(), Some("Hi"));
    conv.append_message(conv.assistant_role(), Some("Hello!"));
    conv.append_message(conv.user_role(), Some("How are you?"));
    conv.append_message(conv.assistant_role(), None);
    let expected = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions. \
USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:";
    assert_eq!(conv.get_prompt(), expected);
    conv.update_last_message(Some("Fine."));
    assert!(conv.get_prompt().ends_with("ASSISTANT: Fine.</s>"));
}

#[test]
fn llama3_matches_reference_rendering() {
    let msgs = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "How are you?"),
    ];
    assert_eq!(
        render_messages("llama-3", &msgs, None).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let with_system = render_messages("llama-3", &msgs[..1], Some("Be brief.")).unwrap();
    assert!(with_system.starts_with(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
    ));
    let conv = get_template("llama-3").unwrap();
    assert_eq!(conv.stop_str(), vec!["<|eot_id|>"]);
    assert_eq!(conv.stop_token_ids(), &[128001, 128009]);
}
