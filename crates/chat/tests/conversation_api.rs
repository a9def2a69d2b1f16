//! The conversation API beyond the golden prompts: FastChat quirks the golden
//! conversations do not reach (expected strings from fschat 0.2.36), exports,
//! the save layout, the wire form and errors.

use serde_json::json;
use vicugna_chat::{
    get_template, render_messages, ChatError, ChatMessage, Conversation, SavedConversation, SeparatorStyle,
};

fn turns(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
}

#[test]
fn fastchat_quirks() {
    // Yuan2: rstrip("<n>") strips a trailing run of '<', 'n', '>' characters.
    let yuan2 = render_messages(
        "yuan2",
        &turns(&[
            ("user", "Tell me about Python"),
            ("assistant", "It is a snake, not an aeon"),
        ]),
        Some("sys"),
    )
    .unwrap();
    assert_eq!(yuan2, "sys\nTell me about Python<n>It is a snake, not an aeo<sep>");

    // RWKV collapses blank lines inside a message (one pass, CRLF first).
    let rwkv = render_messages("rwkv", &turns(&[("user", "a\r\n\r\nb\n\n\nc")]), None).unwrap();
    assert!(rwkv.ends_with("Bob: a\nb\n\nc\n\nAlice:"), "{rwkv:?}");

    // An empty message is an open turn, as FastChat's `if message:`.
    let vicuna = render_messages("vicuna_v1.1", &turns(&[("user", "Hi"), ("assistant", "")]), None).unwrap();
    assert!(vicuna.ends_with(" USER: Hi ASSISTANT:"), "{vicuna:?}");

    // ChatGLM2 numbers rounds from 1.
    let glm2 = render_messages(
        "chatglm2",
        &turns(&[("user", "Hi"), ("assistant", "Yo"), ("user", "Q")]),
        None,
    )
    .unwrap();
    assert_eq!(glm2, "[Round 1]\n\n问：Hi\n\n答：Yo\n\n[Round 2]\n\n问：Q\n\n答：");

    let llama2 = render_messages(
        "llama-2",
        &turns(&[("user", "Hi"), ("assistant", "Yo"), ("user", "Q")]),
        Some("SYS"),
    )
    .unwrap();
    assert_eq!(
        llama2,
        "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST] Yo </s><s>[INST] Q [/INST]"
    );
}

#[test]
fn system_messages_in_the_list_override_the_argument() {
    let msgs = turns(&[("system", "From list."), ("user", "Hi")]);
    let p = render_messages("vicuna_v1.1", &msgs, Some("From argument.")).unwrap();
    assert_eq!(p, "From list. USER: Hi ASSISTANT:");
}

#[test]
fn bad_role_and_unknown_template_are_typed_errors() {
    let err = render_messages("vicuna_v1.1", &turns(&[("tool", "{}")]), None).unwrap_err();
    assert!(matches!(&err, ChatError::BadRole { role } if role == "tool"), "{err}");
    let err = render_messages("Llama-2", &[], None).unwrap_err();
    match err {
        ChatError::UnknownTemplate { name, suggestions } => {
            assert_eq!(name, "Llama-2");
            assert!(suggestions.iter().any(|s| s == "llama-2"), "{suggestions:?}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn openai_export_skips_few_shot_and_open_turns() {
    let one_shot = get_template("one_shot").unwrap();
    let exported = one_shot.to_openai_api_messages();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0].role, "system");

    let conv = Conversation::from_messages("vicuna_v1.1", &turns(&[("user", "Hi")]), None).unwrap();
    let exported = conv.to_openai_api_messages();
    assert_eq!(
        exported.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
        ["system", "user"]
    );
    assert_eq!(exported[1].content, "Hi");
}

/// `to_saved` writes FastChat's `conv.dict()` layout and `from_saved` reads it back.
#[test]
fn save_layout_round_trips() {
    let conv = Conversation::from_messages("vicuna_v1.1", &turns(&[("user", "Hi")]), None).unwrap();
    let saved = serde_json::to_value(conv.to_saved()).unwrap();
    // What fschat 0.2.36 writes for the same conversation.
    let fastchat = json!({
        "template_name": "vicuna_v1.1",
        "system_message": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "roles": ["USER", "ASSISTANT"],
        "messages": [["USER", "Hi"], ["ASSISTANT", null]],
        "offset": 0
    });
    assert_eq!(saved, fastchat);
    let loaded: SavedConversation = serde_json::from_value(fastchat).unwrap();
    assert_eq!(Conversation::from_saved(&loaded).unwrap(), conv);
}

/// Serialized, a conversation is FastChat's dataclass as its worker sends it.
#[test]
fn wire_form_uses_fastchat_fields() {
    let conv = get_template("qwen-7b-chat").unwrap();
    let wire = serde_json::to_value(&conv).unwrap();
    assert_eq!(wire["name"], "qwen-7b-chat");
    assert_eq!(wire["system_template"], "<|im_start|>system\n{system_message}");
    assert_eq!(wire["sep_style"], 10);
    assert_eq!(wire["stop_token_ids"], json!([151643, 151644, 151645]));
    let back: Conversation = serde_json::from_value(wire).unwrap();
    assert_eq!(back, conv);
    assert_eq!(SeparatorStyle::from_name("CHATML"), Some(SeparatorStyle::ChatMl));
    assert_eq!(conv.stop_str(), vec!["<|endoftext|>"]);
}
