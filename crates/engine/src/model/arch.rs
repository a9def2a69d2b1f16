//! What sets each architecture apart, as data: the forward passes, the loader and
//! `vicugna convert` read these fields instead of matching on the family. Adding a
//! family is one `Spec` here (plus its config fields in `config.rs`) and whatever
//! is truly new in its arithmetic.

/// The architectures the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
    Phi3,
    Mixtral,
}

/// The activation inside the gated MLP: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(x)` (llama, qwen, mistral, phi3, mixtral).
    Silu,
    /// GELU with the tanh approximation (gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// One family's fixed traits (its shape comes from the config).
#[derive(Debug)]
pub struct Spec {
    pub arch: Arch,
    /// HF `model_type` values.
    pub model_types: &'static [&'static str],
    /// HF class in `architectures`.
    pub hf_class: &'static str,
    /// llama.cpp's `general.architecture` (also the prefix of its metadata keys).
    pub gguf_arch: &'static str,
    /// Added to every RMSNorm weight as HF stores it (gemma's `x · (1 + w)`).
    /// llama.cpp's converter folds it into the stored weight, so GGUF norms are
    /// shifted back when read and forward when written.
    pub norm_offset: f32,
    /// Embeddings are multiplied by √hidden (gemma).
    pub embed_scale: bool,
    /// RMSNorm over each query and key head before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// Norms after attention and after the MLP too, before the residual add
    /// (gemma3's four norms per layer).
    pub sandwich_norms: bool,
    /// q, k and v stored as one `qkv_proj` (phi3).
    pub fused_qkv: bool,
    /// gate and up stored as one `gate_up_proj` (phi3).
    pub fused_gate_up: bool,
    /// Bias on q/k/v unless the config says otherwise (qwen2).
    pub qkv_bias: bool,
    /// llama.cpp interleaves q/k rows per head for its RoPE in this family.
    pub gguf_permutes_qk: bool,
    /// Experts chosen per token by a router (mixtral).
    pub moe: bool,
    /// The default activation when the config names none.
    pub activation: Activation,
}

const BASE: Spec = Spec {
    arch: Arch::Llama,
    model_types: &["llama"],
    hf_class: "LlamaForCausalLM",
    gguf_arch: "llama",
    norm_offset: 0.0,
    embed_scale: false,
    qk_norm: false,
    sandwich_norms: false,
    fused_qkv: false,
    fused_gate_up: false,
    qkv_bias: false,
    gguf_permutes_qk: true,
    moe: false,
    activation: Activation::Silu,
};

/// Every family, one description each.
pub static SPECS: [Spec; 7] = [
    BASE,
    Spec {
        arch: Arch::Mistral,
        model_types: &["mistral"],
        hf_class: "MistralForCausalLM",
        // llama.cpp writes mistral checkpoints as llama.
        gguf_arch: "llama",
        ..BASE
    },
    Spec {
        arch: Arch::Qwen2,
        model_types: &["qwen2"],
        hf_class: "Qwen2ForCausalLM",
        gguf_arch: "qwen2",
        qkv_bias: true,
        gguf_permutes_qk: false,
        ..BASE
    },
    Spec {
        arch: Arch::Qwen3,
        model_types: &["qwen3"],
        hf_class: "Qwen3ForCausalLM",
        gguf_arch: "qwen3",
        qk_norm: true,
        gguf_permutes_qk: false,
        ..BASE
    },
    Spec {
        arch: Arch::Gemma3,
        model_types: &["gemma3_text"],
        hf_class: "Gemma3ForCausalLM",
        gguf_arch: "gemma3",
        norm_offset: 1.0,
        embed_scale: true,
        qk_norm: true,
        sandwich_norms: true,
        gguf_permutes_qk: false,
        activation: Activation::GeluTanh,
        ..BASE
    },
    Spec {
        arch: Arch::Phi3,
        model_types: &["phi3"],
        hf_class: "Phi3ForCausalLM",
        gguf_arch: "phi3",
        fused_qkv: true,
        fused_gate_up: true,
        gguf_permutes_qk: false,
        ..BASE
    },
    Spec {
        arch: Arch::Mixtral,
        model_types: &["mixtral"],
        hf_class: "MixtralForCausalLM",
        // llama.cpp writes mixtral as llama with `llama.expert_count`.
        gguf_arch: "llama",
        moe: true,
        ..BASE
    },
];

impl Arch {
    /// This family's description.
    pub fn spec(self) -> &'static Spec {
        SPECS
            .iter()
            .find(|s| s.arch == self)
            .unwrap_or_else(|| unreachable!("every Arch has a Spec"))
    }

    /// The name HF uses in `model_type`.
    pub fn name(self) -> &'static str {
        self.spec().model_types[0]
    }

    /// The family of an HF `model_type`.
    pub fn from_model_type(t: &str) -> Option<Arch> {
        SPECS.iter().find(|s| s.model_types.contains(&t)).map(|s| s.arch)
    }

    /// What the error for an unknown architecture lists.
    pub fn supported() -> String {
        SPECS.iter().map(|s| s.model_types[0]).collect::<Vec<_>>().join(", ")
    }
}

impl Activation {
    /// From HF's `hidden_act` / `hidden_activation`.
    pub fn from_hf(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    /// HF's name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}
