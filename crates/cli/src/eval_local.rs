//! A local model as an evaluation [`ChatModel`]: answers and judges without
//! a server, through the engine directly, with the model's chat format.

use anyhow::{Context, Result};
use vicugna_chat::{match_template, ChatFormat, ChatMessage};
use vicugna_engine::{Constraint, EngineHandle, GenerateRequest, Prompt, SamplingParams, StopRules};
use vicugna_eval::{ChatModel, ChatReply, ChatRequest, EvalError, Guide};

use crate::model_arg::ModelArgs;

/// A loaded model and the prompt format chosen for it.
pub struct LocalChat {
    engine: EngineHandle,
    format: ChatFormat,
}

impl LocalChat {
    /// Loads `model` (a path or `default`); `conv_template` overrides the
    /// format (else the model's own chat template, else FastChat's matching).
    pub fn load(model: &ModelArgs, conv_template: Option<&str>) -> Result<Self> {
        let engine = model.start()?;
        let info = engine.info();
        let path = info.path.display().to_string();
        let key = if match_template(&path).is_none() && match_template(&info.name).is_some() {
            info.name.clone()
        } else {
            path
        };
        let model_template = engine.tokenizer().and_then(|t| {
            t.chat_template()
                .map(|src| (src, t.bos_token().unwrap_or(""), t.eos_token().unwrap_or("")))
        });
        let format = ChatFormat::select(conv_template, model_template, &key)
            .context("the model's chat template does not work here; name one with --conv-template")?;
        Ok(LocalChat { engine, format })
    }

    /// The model's name (from its file or directory).
    pub fn name(&self) -> String {
        self.engine.info().name.clone()
    }
}

impl ChatModel for LocalChat {
    fn chat(&self, req: &ChatRequest) -> Result<ChatReply, EvalError> {
        let messages: Vec<ChatMessage> = req
            .messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        let prompt = self
            .format
            .render(&messages, None)
            .map_err(|e| EvalError::Api(format!("chat template: {e}")))?;
        let mut g = GenerateRequest::new(Prompt::Text(prompt), req.max_tokens);
        // FastChat samples only at temperature >= 1e-4.
        g.sampling = if req.temperature < 1e-4 {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                temperature: req.temperature,
                seed: req.seed,
                ..SamplingParams::greedy()
            }
        };
        g.stop = StopRules {
            stop_strings: self.format.stop_strings(),
            stop_token_ids: self.format.stop_token_ids(),
            ignore_eos: false,
        };
        g.add_special_tokens = self.format.add_special_tokens();
        // As FastChat's worker: a prompt longer than the context keeps its end.
        g.truncate_left = true;
        g.constraint = req.guide.as_ref().map(|guide| match guide {
            Guide::Choice(c) => Constraint::Choice(c.clone()),
            Guide::Regex(r) => Constraint::Regex(r.clone()),
            Guide::JsonSchema(s) => Constraint::JsonSchema(s.clone()),
        });
        let out = self
            .engine
            .generate(g)
            .map_err(|e| EvalError::Api(format!("local model: {e}")))?;
        Ok(ChatReply {
            text: out.text.trim().to_string(),
            prompt_tokens: Some(out.usage.prompt_tokens as u64),
            completion_tokens: Some(out.usage.completion_tokens as u64),
        })
    }

    fn supports_guide(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("{} (local, {})", self.name(), self.format.name())
    }
}
