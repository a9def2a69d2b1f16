//! Model name/path → FastChat template, as FastChat 0.2.36's adapters pick it.

use vicugna_chat::{get_template, match_template, DEFAULT_TEMPLATE};

#[test]
fn common_families() {
    let cases = [
        ("lmsys/vicuna-7b-v1.5", "vicuna_v1.1"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2"),
        ("codellama/CodeLlama-7b-Instruct-hf", "llama-2"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3"),
        ("Qwen/Qwen2.5-0.5B-Instruct", "qwen-7b-chat"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "mistral"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral"),
        ("HuggingFaceH4/zephyr-7b-beta", "zephyr"),
        ("THUDM/chatglm-6b", "chatglm"),
        ("THUDM/chatglm2-6b", "chatglm2"),
        ("THUDM/chatglm3-6b", "chatglm3"),
        ("baichuan-inc/Baichuan2-13B-Chat", "baichuan2-chat"),
        ("baichuan-inc/Baichuan-13B-Chat", "baichuan-chat"),
        ("baichuan-inc/Baichuan-7B", "zero_shot"),
        ("allenai/tulu-2-dpo-7b", "tulu"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama"),
        ("01-ai/Yi-34B-Chat", "Yi-34b-chat"),
        ("deepseek-ai/deepseek-llm-67b-chat", "deepseek-chat"),
        ("deepseek-ai/deepseek-coder-6.7b-instruct", "deepseek-coder"),
        ("internlm/internlm-chat-7b", "internlm-chat"),
        ("tiiuae/falcon-7b-instruct", "falcon"),
        ("tiiuae/falcon-180B-chat", "falcon-chat"),
        ("mosaicml/mpt-7b-chat", "mpt-7b-chat"),
        ("mosaicml/mpt-7b", "zero_shot"),
        ("WizardLM/WizardLM-13B-V1.2", "vicuna_v1.1"),
        ("openchat/openchat_3.5", "openchat_3.5"),
        ("upstage/SOLAR-10.7B-Instruct-v1.0", "solar"),
    ];
    for (path, want) in cases {
        assert_eq!(match_template(path), Some(want), "{path}");
    }
}

/// Adapter order decides overlapping names, as in FastChat.
#[test]
fn precedence_follows_fastchat_order() {
    assert_eq!(
        match_template("CarperAI/stable-vicuna-13b-delta"),
        Some("stable-vicuna")
    );
    assert_eq!(
        match_template("teknium/OpenHermes-2.5-Mistral-7B"),
        Some("OpenHermes-2.5-Mistral-7B")
    );
    assert_eq!(
        match_template("Open-Orca/Mistral-7B-OpenOrca"),
        Some("mistral-7b-openorca")
    );
    assert_eq!(
        match_template("cognitivecomputations/dolphin-2.2.1-mistral-7b"),
        Some("dolphin-2.2.1-mistral-7b")
    );
    assert_eq!(match_template("jondurbin/airoboros-l2-70b-3.1.2"), Some("airoboros_v3"));
    assert_eq!(match_template("jondurbin/airoboros-l2-13b-2.2.1"), Some("airoboros_v2"));
    assert_eq!(match_template("jondurbin/airoboros-7b"), Some("airoboros_v1"));
    assert_eq!(match_template("BAAI/AquilaChat2-34B"), Some("aquila-legacy"));
}

/// The last path component is tried before the whole path; a trailing slash
/// is ignored; the v0 check looks at the last component only.
#[test]
fn basename_then_full_path() {
    assert_eq!(
        match_template("/home/zephyr/models/vicuna-7b-v1.3"),
        Some("vicuna_v1.1")
    );
    assert_eq!(match_template("/models/vicuna-ft/checkpoint-1000"), Some("vicuna_v1.1"));
    assert_eq!(match_template("/models/Llama-2-7b-chat-hf/"), Some("llama-2"));
    assert_eq!(match_template("/weights/vicuna-13b-v0"), Some("one_shot"));
    assert_eq!(match_template("/v0/vicuna-13b"), Some("vicuna_v1.1"));
}

/// Unknown families give `None`; FastChat's fallback is `one_shot`.
#[test]
fn unknown_models_fall_back() {
    assert_eq!(match_template("/data/models/SmolLM2-135M-Instruct"), None);
    assert_eq!(match_template("gpt2"), None);
    assert_eq!(DEFAULT_TEMPLATE, "one_shot");
    assert!(get_template(DEFAULT_TEMPLATE).is_some());
    // API-only families are recognised but have no text template.
    assert_eq!(match_template("gemini-pro"), None);
}
