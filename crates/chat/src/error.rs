//! The crate's error type.

/// Everything that can go wrong while building or rendering a chat prompt.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// No conversation template has this name; `suggestions` holds the closest
    /// known names (possibly none) so a typo can be fixed from the message alone.
    #[error("unknown conversation template {name:?}{}", suggest(suggestions))]
    UnknownTemplate {
        /// The name asked for.
        name: String,
        /// Known template names that look like it, best first.
        suggestions: Vec<String>,
    },
    /// A chat message had a role other than `system`, `user` or `assistant`.
    #[error("unsupported message role {role:?}: expected \"system\", \"user\" or \"assistant\"")]
    BadRole {
        /// The offending role.
        role: String,
    },
    /// A Jinja chat template called `raise_exception(message)`; models use this
    /// to reject conversations they cannot format (e.g. roles not alternating).
    #[error("chat template raised an exception: {message}")]
    TemplateException {
        /// The message the template passed to `raise_exception`.
        message: String,
    },
    /// A Jinja chat template failed to compile or render.
    #[error("chat template error: {message}")]
    Template {
        /// minijinja's description, with the line where it happened.
        message: String,
    },
    /// A tokenizer config carried no usable `chat_template`.
    #[error("tokenizer config has no chat_template{}", name.as_ref().map(|n| format!(" named {n:?}")).unwrap_or_default())]
    MissingChatTemplate {
        /// The named template asked for, when the config holds several.
        name: Option<String>,
    },
}

/// Formats the "did you mean" tail of [`ChatError::UnknownTemplate`].
fn suggest(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", names.join(", "))
    }
}
