//! Model name/path → conversation template, as FastChat's model adapters choose.
//!
//! FastChat keeps an ordered list of adapters, each with a `match(path)` test
//! and a `get_default_conv_template(path)`. The first adapter matching the
//! path's last component wins; failing that, the first matching the whole
//! path. The order matters (e.g. `stable-vicuna` before `vicuna`, `mistral`
//! after the Mistral fine-tunes), so the table below keeps FastChat 0.2.36's
//! registration order. Left out: the PEFT adapter (it reads the base model
//! from `adapter_config.json` on disk; match the base model's path instead)
//! and the API-only adapters whose names are exact lists (OpenAI, Anthropic,
//! PaLM, Perplexity). Added: `llama-3`, from FastChat's main branch.

/// The template FastChat falls back to when no adapter matches (its
/// `BaseModelAdapter`). We keep it so a vicugna worker advertises the same
/// template a FastChat worker would; but for a model that ships a Jinja
/// `chat_template`, prefer that over this default (see `HfChatTemplate`).
pub const DEFAULT_TEMPLATE: &str = "one_shot";

/// One FastChat model adapter: its match test and its template choice.
struct Adapter {
    /// FastChat's class name, for readers cross-checking the table.
    #[allow(dead_code)]
    name: &'static str,
    /// FastChat's `match(model_path)`, given the basename or the full path.
    matches: fn(&str) -> bool,
    /// FastChat's `get_default_conv_template(model_path)`, always given the full
    /// path; `None` for adapters whose template has no text prompt format.
    template: fn(&str) -> Option<&'static str>,
}

/// Lower-cased `s` contains every needle.
fn has_all(s: &str, needles: &[&str]) -> bool {
    let s = s.to_lowercase();
    needles.iter().all(|n| s.contains(n))
}

/// Lower-cased `s` contains any needle.
fn has_any(s: &str, needles: &[&str]) -> bool {
    let s = s.to_lowercase();
    needles.iter().any(|n| s.contains(n))
}

/// Python's `os.path.basename(os.path.normpath(path))`, for `/`-separated paths.
fn basename(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or(path)
}

/// FastChat 0.2.36's adapter list (see the module doc for what is left out).
// One adapter per line reads as the table it is; rustfmt would explode it.
#[rustfmt::skip]
const ADAPTERS: &[Adapter] = &[
    Adapter { name: "StableVicunaAdapter", matches: |p| has_all(p, &["stable-vicuna"]), template: |_| Some("stable-vicuna") },
    Adapter {
        name: "VicunaAdapter",
        matches: |p| has_all(p, &["vicuna"]),
        // Vicuna v0 weights were trained on the older one-shot format.
        template: |p| Some(if basename(p).contains("v0") { "one_shot" } else { "vicuna_v1.1" }),
    },
    Adapter {
        name: "AiroborosAdapter",
        matches: |p| has_any(p, &["airoboros", "spicyboros"]),
        template: |p| {
            Some(if p.contains("-3.") || p.contains("-3p") {
                "airoboros_v3"
            } else if p.contains("spicyboros") || has_version_2_2_plus(p) {
                "airoboros_v2"
            } else {
                "airoboros_v1"
            })
        },
    },
    Adapter { name: "LongChatAdapter", matches: |p| has_all(p, &["longchat"]), template: |_| Some("vicuna_v1.1") },
    Adapter { name: "GoogleT5Adapter", matches: |p| has_any(p, &["flan-", "fastchat-t5", "codet5p"]), template: |_| Some(DEFAULT_TEMPLATE) },
    Adapter { name: "KoalaAdapter", matches: |p| has_all(p, &["koala"]), template: |_| Some("koala_v1") },
    Adapter { name: "AlpacaAdapter", matches: |p| has_all(p, &["alpaca"]), template: |_| Some("alpaca") },
    Adapter {
        name: "ChatGLMAdapter",
        matches: |p| has_all(p, &["chatglm"]),
        template: |p| {
            Some(if has_all(p, &["chatglm2"]) {
                "chatglm2"
            } else if has_all(p, &["chatglm3"]) {
                "chatglm3"
            } else {
                "chatglm"
            })
        },
    },
    Adapter { name: "CodeGeexAdapter", matches: |p| has_all(p, &["codegeex"]), template: |_| Some("codegeex") },
    Adapter { name: "DollyV2Adapter", matches: |p| has_all(p, &["dolly-v2"]), template: |_| Some("dolly_v2") },
    Adapter { name: "OasstPythiaAdapter", matches: |p| has_all(p, &["oasst", "pythia"]), template: |_| Some("oasst_pythia") },
    Adapter {
        name: "OasstLLaMAAdapter",
        matches: |p| has_all(p, &["openassistant-sft-7-llama-30b-hf"]) || (has_all(p, &["oasst"]) && !has_all(p, &["pythia"])),
        template: |_| Some("oasst_llama"),
    },
    Adapter {
        name: "OpenChat35Adapter",
        matches: |p| has_all(p, &["openchat", "3.5"]) || has_all(p, &["starling-lm"]),
        template: |_| Some("openchat_3.5"),
    },
    Adapter { name: "TenyxChatAdapter", matches: |p| has_all(p, &["tenyxchat"]), template: |_| Some("tenyxchat") },
    Adapter { name: "StableLMAdapter", matches: |p| has_all(p, &["stablelm"]), template: |_| Some("stablelm") },
    Adapter { name: "BaizeAdapter", matches: |p| has_all(p, &["baize"]), template: |_| Some("baize") },
    Adapter { name: "RwkvAdapter", matches: |p| has_all(p, &["rwkv-4"]), template: |_| Some("rwkv") },
    Adapter { name: "OpenBuddyAdapter", matches: |p| has_all(p, &["openbuddy"]), template: |_| Some("openbuddy") },
    Adapter { name: "PhoenixAdapter", matches: |p| has_all(p, &["phoenix"]), template: |_| Some("phoenix") },
    // Gemini/Bard are API models: matched (so precedence stays FastChat's) but
    // their template has no text prompt.
    Adapter { name: "GeminiAdapter", matches: |p| has_any(p, &["gemini", "bard"]), template: |_| None },
    Adapter {
        name: "MPTAdapter",
        matches: |p| has_all(p, &["mpt"]) && !has_all(p, &["airoboros"]),
        template: |p| {
            let p = p.to_lowercase();
            Some(if p.contains("mpt-7b-chat") {
                "mpt-7b-chat"
            } else if p.contains("mpt-30b-chat") {
                "mpt-30b-chat"
            } else if p.contains("mpt-30b-instruct") {
                "mpt-30b-instruct"
            } else {
                "zero_shot"
            })
        },
    },
    Adapter { name: "BiLLaAdapter", matches: |p| has_all(p, &["billa"]), template: |_| Some("billa") },
    Adapter { name: "RedPajamaINCITEAdapter", matches: |p| has_all(p, &["redpajama-incite"]), template: |_| Some("redpajama-incite") },
    Adapter { name: "H2OGPTAdapter", matches: |p| has_all(p, &["h2ogpt"]), template: |_| Some("h2ogpt") },
    Adapter { name: "RobinAdapter", matches: |p| has_all(p, &["robin"]), template: |_| Some("Robin") },
    Adapter { name: "SnoozyAdapter", matches: |p| has_all(p, &["gpt4all", "snoozy"]), template: |_| Some("snoozy") },
    Adapter {
        name: "WizardLMAdapter",
        matches: |p| has_all(p, &["wizardlm"]),
        template: |p| Some(if has_any(p, &["13b", "30b", "70b"]) { "vicuna_v1.1" } else { "one_shot" }),
    },
    Adapter { name: "ManticoreAdapter", matches: |p| has_all(p, &["manticore"]), template: |_| Some("manticore") },
    Adapter { name: "GuanacoAdapter", matches: |p| has_all(p, &["guanaco"]), template: |_| Some("zero_shot") },
    Adapter { name: "CamelAdapter", matches: |p| has_all(p, &["camel"]), template: |_| Some("vicuna_v1.1") },
    Adapter { name: "ChangGPTAdapter", matches: |p| has_all(p, &["polyglot", "chang"]), template: |_| Some("polyglot_changgpt") },
    Adapter { name: "TuluAdapter", matches: |p| has_all(p, &["tulu"]), template: |_| Some("tulu") },
    Adapter { name: "FalconChatAdapter", matches: |p| has_all(p, &["falcon", "chat"]), template: |_| Some("falcon-chat") },
    Adapter { name: "FalconAdapter", matches: |p| has_all(p, &["falcon"]) && !has_all(p, &["chat"]), template: |_| Some("falcon") },
    Adapter { name: "TigerBotAdapter", matches: |p| has_all(p, &["tigerbot"]), template: |_| Some("tigerbot") },
    Adapter {
        name: "BaichuanAdapter",
        matches: |p| has_all(p, &["baichuan"]),
        template: |p| {
            Some(if !has_all(p, &["chat"]) {
                "zero_shot"
            } else if has_all(p, &["baichuan2"]) {
                "baichuan2-chat"
            } else {
                "baichuan-chat"
            })
        },
    },
    Adapter { name: "XGenAdapter", matches: |p| has_all(p, &["xgen"]), template: |_| Some("xgen") },
    Adapter { name: "PythiaAdapter", matches: |p| has_all(p, &["pythia"]), template: |_| Some(DEFAULT_TEMPLATE) },
    Adapter { name: "InternLMChatAdapter", matches: |p| has_all(p, &["internlm"]), template: |_| Some("internlm-chat") },
    Adapter { name: "StarChatAdapter", matches: |p| has_all(p, &["starchat"]), template: |_| Some("starchat") },
    Adapter { name: "Llama2Adapter", matches: |p| has_all(p, &["llama-2"]), template: |_| Some("llama-2") },
    // From FastChat's main branch (0.2.36 predates Llama 3); also covers 3.1/3.2.
    Adapter { name: "Llama3Adapter", matches: |p| has_all(p, &["llama-3"]), template: |_| Some("llama-3") },
    Adapter { name: "CuteGPTAdapter", matches: |p| has_all(p, &["cutegpt"]), template: |_| Some("cutegpt") },
    Adapter {
        name: "OpenOrcaAdapter",
        matches: |p| has_any(p, &["mistral-7b-openorca", "openorca"]),
        template: |p| Some(if has_all(p, &["mistral-7b-openorca"]) { "mistral-7b-openorca" } else { "open-orca" }),
    },
    Adapter { name: "DolphinAdapter", matches: |p| has_all(p, &["dolphin", "mistral"]), template: |_| Some("dolphin-2.2.1-mistral-7b") },
    Adapter {
        name: "Hermes2Adapter",
        matches: |p| has_any(p, &["openhermes-2.5-mistral-7b", "openhermes-2-mistral-7b"]),
        template: |_| Some("OpenHermes-2.5-Mistral-7B"),
    },
    Adapter {
        name: "NousHermes2MixtralAdapter",
        matches: |p| has_any(p, &["nous-hermes-2-mixtral-8x7b-dpo", "nous-hermes-2-mixtral-8x7b-sft"]),
        template: |_| Some("Nous-Hermes-2-Mixtral-8x7B-DPO"),
    },
    Adapter { name: "NousHermesAdapter", matches: |p| has_all(p, &["nous-hermes"]), template: |_| Some("alpaca") },
    Adapter { name: "MistralAdapter", matches: |p| has_any(p, &["mistral", "mixtral"]), template: |_| Some("mistral") },
    Adapter { name: "WizardCoderAdapter", matches: |p| has_all(p, &["wizardcoder"]), template: |_| Some("alpaca") },
    Adapter { name: "QwenChatAdapter", matches: |p| has_all(p, &["qwen"]), template: |_| Some("qwen-7b-chat") },
    Adapter {
        name: "AquilaChatAdapter",
        matches: |p| has_all(p, &["aquila"]),
        template: |p| {
            Some(if !has_all(p, &["aquilachat2"]) {
                "aquila-chat"
            } else if has_all(p, &["16k"]) {
                "aquila"
            } else if has_all(p, &["34b"]) {
                "aquila-legacy"
            } else {
                "aquila-v1"
            })
        },
    },
    Adapter { name: "BGEAdapter", matches: |p| has_all(p, &["bge"]), template: |_| Some(DEFAULT_TEMPLATE) },
    Adapter { name: "E5Adapter", matches: |p| has_all(p, &["e5-"]), template: |_| Some(DEFAULT_TEMPLATE) },
    Adapter { name: "Lamma2ChineseAdapter", matches: |p| has_all(p, &["llama2-chinese"]), template: |_| Some("llama2-chinese") },
    Adapter { name: "Lamma2ChineseAlpacaAdapter", matches: |p| has_all(p, &["chinese-alpaca"]), template: |_| Some("chinese-alpaca2") },
    Adapter {
        name: "VigogneAdapter",
        matches: |p| has_any(p, &["vigogne", "vigostral"]),
        template: |p| {
            Some(if !has_all(p, &["chat"]) {
                "vigogne_instruct"
            } else if has_all(p, &["vigostral"]) {
                "vigogne_chat_v3"
            } else {
                "vigogne_chat_v2"
            })
        },
    },
    Adapter { name: "OpenLLaMaOpenInstructAdapter", matches: |p| has_all(p, &["open-llama", "open-instruct"]), template: |_| Some("alpaca") },
    // Case-sensitive in FastChat.
    Adapter { name: "ReaLMAdapter", matches: |p| p.contains("ReaLM"), template: |_| Some("ReaLM-7b-v1") },
    Adapter { name: "PhindCodeLlamaAdapter", matches: |p| has_all(p, &["phind-codellama-"]), template: |_| Some("phind") },
    Adapter { name: "CodeLlamaAdapter", matches: |p| has_all(p, &["codellama"]), template: |_| Some("llama-2") },
    Adapter { name: "Llama2ChangAdapter", matches: |p| has_all(p, &["llama2-ko-chang"]), template: |_| Some("polyglot_changgpt") },
    Adapter { name: "ZephyrAdapter", matches: |p| has_all(p, &["zephyr"]), template: |_| Some("zephyr") },
    Adapter { name: "NotusAdapter", matches: |p| has_all(p, &["notus"]), template: |_| Some("zephyr") },
    Adapter { name: "CatPPTAdapter", matches: |p| has_all(p, &["catppt"]), template: |_| Some("catppt") },
    Adapter { name: "TinyLlamaAdapter", matches: |p| has_all(p, &["tinyllama"]), template: |_| Some("TinyLlama") },
    Adapter { name: "XwinLMAdapter", matches: |p| has_all(p, &["xwin-lm"]), template: |_| Some("vicuna_v1.1") },
    Adapter { name: "LemurAdapter", matches: |p| has_all(p, &["lemur-70b-chat"]), template: |_| Some("lemur-70b-chat") },
    Adapter { name: "PygmalionAdapter", matches: |p| has_any(p, &["pygmalion", "mythalion", "metharme"]), template: |_| Some("metharme") },
    Adapter { name: "MicrosoftOrcaAdapter", matches: |p| has_all(p, &["orca-2"]), template: |_| Some("orca-2") },
    Adapter { name: "XdanAdapter", matches: |p| has_all(p, &["xdan", "v1"]), template: |_| Some("xdan-v1") },
    Adapter { name: "YiAdapter", matches: |p| has_all(p, &["yi-", "chat"]), template: |_| Some("Yi-34b-chat") },
    Adapter { name: "DeepseekCoderAdapter", matches: |p| has_all(p, &["deepseek-coder"]), template: |_| Some("deepseek-coder") },
    Adapter { name: "DeepseekChatAdapter", matches: |p| has_all(p, &["deepseek-llm", "chat"]), template: |_| Some("deepseek-chat") },
    Adapter { name: "Yuan2Adapter", matches: |p| has_all(p, &["yuan2"]), template: |_| Some("yuan2") },
    Adapter { name: "MetaMathAdapter", matches: |p| has_all(p, &["metamath"]), template: |_| Some("metamath") },
    Adapter { name: "BagelAdapter", matches: |p| has_all(p, &["bagel"]), template: |_| Some("airoboros_v3") },
    Adapter { name: "SolarAdapter", matches: |p| has_all(p, &["solar-", "instruct"]), template: |_| Some("solar") },
    // SteerLM's template is API-only (no text prompt).
    Adapter { name: "SteerLMAdapter", matches: |p| has_all(p, &["steerlm-chat"]), template: |_| None },
    Adapter { name: "LlavaAdapter", matches: |p| has_all(p, &["llava"]), template: |_| Some("vicuna_v1.1") },
    Adapter { name: "YuanAdapter", matches: |p| has_all(p, &["yuan"]), template: |_| Some("yuan") },
];

/// FastChat's `re.search(r"-(2\.[2-9]+)", path)`: airoboros 2.2 and later.
fn has_version_2_2_plus(path: &str) -> bool {
    path.match_indices("-2.")
        .any(|(i, _)| matches!(path.as_bytes().get(i + 3), Some(b'2'..=b'9')))
}

/// The FastChat template for a model name or path, as FastChat's adapters
/// choose it (`vicuna` → `vicuna_v1.1`, `llama-2` → `llama-2`, `qwen` →
/// `qwen-7b-chat`, `mistral` → `mistral`, `llama-3` → `llama-3`, …).
///
/// `None` when no model family is recognised (FastChat would then use
/// [`DEFAULT_TEMPLATE`]) or the family's template is API-only. Callers should
/// then prefer the model's own Jinja `chat_template` when it has one, and fall
/// back to [`DEFAULT_TEMPLATE`] only when it has not.
pub fn match_template(model_name_or_path: &str) -> Option<&'static str> {
    let base = basename(model_name_or_path);
    let adapter = ADAPTERS
        .iter()
        .find(|a| (a.matches)(base))
        .or_else(|| ADAPTERS.iter().find(|a| (a.matches)(model_name_or_path)))?;
    (adapter.template)(model_name_or_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_adapter_template_exists() {
        let names = crate::template_names();
        for a in ADAPTERS {
            for probe in [
                "",
                "chat",
                "mpt-7b-chat",
                "aquilachat2-34b",
                "-3.1",
                "-2.2",
                "vigostral-chat",
            ] {
                if let Some(t) = (a.template)(probe) {
                    assert!(names.contains(&t), "{} → {t} is not a template", a.name);
                }
            }
        }
        assert!(names.contains(&DEFAULT_TEMPLATE));
    }

    #[test]
    fn airoboros_versions() {
        assert!(has_version_2_2_plus("airoboros-l2-13b-2.2.1"));
        assert!(!has_version_2_2_plus("airoboros-l2-13b-2.1"));
    }
}
