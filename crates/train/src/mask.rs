//! Loss masks: which tokens of a rendered conversation the model is trained to
//! predict. Only the assistant's words and the marker that ends its turn carry
//! labels; system, user and template text do not.
//!
//! The mask is computed on the rendered prompt's text, not by re-tokenizing
//! pieces: each assistant turn's character span is found by rendering the
//! conversation up to the turn (generation prompt open) and through it, the
//! whole prompt is tokenized once, and a token is labelled when its character
//! offsets overlap an assistant span. Token counts of separately tokenized
//! pieces never enter, so FastChat's "tokenization mismatch" (labels shifted
//! when a piece tokenizes differently alone than in context) cannot happen.

use vicugna_chat::{ChatFormat, ChatMessage};
use vicugna_engine::tokenizer::Tokenizer;

use crate::data::{Role, Sample};
use crate::error::{Result, TrainError};

/// A conversation as token ids with their labels.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub id: String,
    /// The rendered prompt.
    pub text: String,
    pub ids: Vec<u32>,
    /// Whether the model is trained to predict this token.
    pub labels: Vec<bool>,
    /// Byte range of each token in `text`.
    pub offsets: Vec<(usize, usize)>,
    /// Byte ranges of `text` that carry labels: each assistant turn and its end marker.
    pub spans: Vec<(usize, usize)>,
    /// Tokens cut off by the length limit.
    pub truncated: usize,
}

impl Encoded {
    /// Number of labelled tokens (the loss is averaged over these).
    pub fn label_count(&self) -> usize {
        self.labels.iter().filter(|&&l| l).count()
    }
}

/// A sample's turns as OpenAI-style messages.
pub fn messages(sample: &Sample) -> Result<Vec<ChatMessage>> {
    sample
        .conversations
        .iter()
        .enumerate()
        .map(|(i, t)| match Role::of(&t.from) {
            Some(r) => Ok(ChatMessage::new(r.name(), t.value.clone())),
            None => Err(TrainError::BadSample {
                id: sample.id.clone(),
                message: format!(
                    "turn {} has speaker {:?}; expected human/user, gpt/assistant or system",
                    i + 1,
                    t.from
                ),
            }),
        })
        .collect()
}

/// How a conversation becomes labelled tokens.
pub struct Masker<'a> {
    pub format: &'a ChatFormat,
    pub tokenizer: &'a Tokenizer,
    /// Replaces the template's system message.
    pub system: Option<&'a str>,
    /// Texts that end an assistant turn besides the template's stop strings: the
    /// tokenizer's EOS token, `</s>`.
    markers: Vec<String>,
}

impl<'a> Masker<'a> {
    /// A masker for one template and tokenizer.
    pub fn new(format: &'a ChatFormat, tokenizer: &'a Tokenizer, system: Option<&'a str>) -> Self {
        let mut markers = format.stop_strings();
        if let Some(eos) = tokenizer.eos_token() {
            markers.push(eos.to_string());
        }
        markers.push("</s>".to_string());
        markers.retain(|m| !m.is_empty());
        Masker {
            format,
            tokenizer,
            system,
            markers,
        }
    }

    /// The rendered prompt and the byte span of each assistant turn with its end marker.
    pub fn spans(&self, id: &str, msgs: &[ChatMessage]) -> Result<(String, Vec<(usize, usize)>)> {
        let bad = |message: String| TrainError::BadSample { id: id.into(), message };
        let full = self.format.render(msgs, self.system)?;
        let mut spans = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let open = self.format.render(&msgs[..i], self.system)?;
            let closed = self.format.render(&msgs[..=i], self.system)?;
            if !closed.starts_with(&open) || !full.starts_with(&closed) {
                return Err(bad(format!(
                    "template {} does not render this conversation incrementally (turn {} changes earlier text), \
                     so the assistant's words cannot be located",
                    self.format.name(),
                    i + 1
                )));
            }
            let content = m.content.trim();
            let delta = &closed[open.len()..];
            let Some(pos) = delta.find(content) else {
                return Err(bad(format!(
                    "template {} does not write turn {}'s text verbatim",
                    self.format.name(),
                    i + 1
                )));
            };
            let start = open.len() + pos;
            let content_end = start + content.len();
            let rest = &closed[content_end..];
            // The end marker: the first stop string / EOS after the content (across
            // whitespace), else the template's separator itself.
            let marker_end = self
                .markers
                .iter()
                .filter_map(|mk| rest.find(mk.as_str()).map(|p| (p, p + mk.len())))
                .filter(|&(p, _)| rest[..p].trim().is_empty())
                .min()
                .map(|(_, e)| e)
                .unwrap_or_else(|| rest.trim_end().len());
            let end = content_end + marker_end;
            if end > start {
                spans.push((start, end));
            }
        }
        Ok((full, spans))
    }

    /// Renders, tokenizes and labels a sample, keeping at most `max_len` tokens.
    pub fn encode(&self, sample: &Sample, max_len: Option<usize>) -> Result<Encoded> {
        let msgs = messages(sample)?;
        let (text, spans) = self.spans(&sample.id, &msgs)?;
        let enc = self
            .tokenizer
            .inner()
            .encode(text.as_str(), self.format.add_special_tokens())
            .map_err(|e| TrainError::BadSample {
                id: sample.id.clone(),
                message: format!("tokenizing: {e}"),
            })?;
        let mut ids = enc.get_ids().to_vec();
        let mut offsets = enc.get_offsets().to_vec();
        let special = enc.get_special_tokens_mask();
        let mut labels: Vec<bool> = offsets
            .iter()
            .zip(special)
            .map(|(&(s, e), &sp)| {
                // Added special tokens (BOS) have empty ranges and sit outside every span.
                let added = sp == 1 && s == e;
                !added && e > s && spans.iter().any(|&(a, b)| s < b && e > a)
            })
            .collect();
        let mut truncated = 0;
        if let Some(max) = max_len {
            if ids.len() > max {
                truncated = ids.len() - max;
                ids.truncate(max);
                labels.truncate(max);
                offsets.truncate(max);
            }
        }
        Ok(Encoded {
            id: sample.id.clone(),
            text,
            ids,
            labels,
            offsets,
            spans,
            truncated,
        })
    }
}

/// One line per token: index, id, whether it is trained on, and its text.
pub fn show_mask(enc: &Encoded, tok: &Tokenizer) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:>6} {:>7}  {:<5}  token\n", "pos", "id", "label"));
    for (i, (&id, &l)) in enc.ids.iter().zip(&enc.labels).enumerate() {
        let piece = match enc.offsets.get(i) {
            Some(&(s, e)) if e > s => enc.text[s..e].to_string(),
            _ => tok.decode(&[id], false).unwrap_or_default(),
        };
        out.push_str(&format!(
            "{i:>6} {id:>7}  {:<5}  {}\n",
            if l { "train" } else { "-" },
            serde_json::to_string(&piece).unwrap_or_default()
        ));
    }
    let n = enc.label_count();
    out.push_str(&format!(
        "{} tokens, {n} trained on ({:.1}%), {} cut by --max-len\n",
        enc.ids.len(),
        100.0 * n as f64 / enc.ids.len().max(1) as f64,
        enc.truncated
    ));
    out
}

/// The tokenizer and chat format of a model, without loading its weights: an HF
/// directory's `tokenizer.json`/`tokenizer_config.json`, or a GGUF's metadata.
pub fn tokenizer_and_format(model: &std::path::Path, template: Option<&str>) -> Result<(Tokenizer, ChatFormat)> {
    let tok = if model.is_dir() {
        Tokenizer::from_hf_dir(model)?
    } else {
        let src = vicugna_engine::weights::GgufSource::open(model, &candle_core::Device::Cpu)?;
        Tokenizer::from_gguf(&src.content, model)?
    };
    let model_template = tok
        .chat_template()
        .map(|t| (t, tok.bos_token().unwrap_or(""), tok.eos_token().unwrap_or("")));
    let format = ChatFormat::select(template, model_template, &model.to_string_lossy())?;
    Ok((tok, format))
}
