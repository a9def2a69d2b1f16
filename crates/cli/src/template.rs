//! `vicugna template`: list FastChat's named templates, render one exactly.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Subcommand;
use vicugna_chat::ChatMessage;

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Print every template name, one a line.
    List,
    /// Print the prompt for a conversation, byte for byte (no trailing newline).
    Render {
        /// Template name (see `vicugna template list`).
        #[arg(long)]
        template: String,
        /// JSON file: a list of {role, content}; a trailing user message leaves the assistant turn open.
        #[arg(long)]
        messages: std::path::PathBuf,
        /// System message replacing the template's own.
        #[arg(long)]
        system: Option<String>,
    },
}

pub fn run(c: TemplateCommand) -> Result<()> {
    match c {
        TemplateCommand::List => {
            for n in vicugna_chat::template_names() {
                println!("{n}");
            }
        }
        TemplateCommand::Render {
            template,
            messages,
            system,
        } => {
            let text = std::fs::read_to_string(&messages).with_context(|| format!("{}", messages.display()))?;
            let msgs: Vec<ChatMessage> = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: expected a JSON list of {{\"role\", \"content\"}} objects",
                    messages.display()
                )
            })?;
            let prompt = vicugna_chat::render_messages(&template, &msgs, system.as_deref())?;
            let mut out = std::io::stdout().lock();
            out.write_all(prompt.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}
