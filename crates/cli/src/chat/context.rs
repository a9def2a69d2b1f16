//! Keeping a conversation inside the model's context window.

use vicugna_chat::ChatMessage;

/// What [`fit`] did to make the prompt fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// The prompt's token ids, left-cut when even the last message alone
    /// does not fit.
    pub ids: Vec<u32>,
    /// The rendered prompt text (before any cut).
    pub prompt: String,
    /// Whole turns (a user message and the reply to it) dropped from the front.
    pub dropped_turns: usize,
    /// Tokens cut from the front of the prompt (0 normally).
    pub cut_tokens: usize,
    /// Tokens the answer may take: `max_new_tokens`, less where the context
    /// ends sooner.
    pub max_new_tokens: usize,
}

/// Tokens kept free for the answer when deciding whether history fits:
/// `max_new_tokens`, but at most half the context, so that a large
/// `--max-new-tokens` does not leave room for no history at all.
pub fn reserve(max_new_tokens: usize, context: usize) -> usize {
    max_new_tokens.min(context / 2).max(1)
}

/// Drops the oldest turns of `messages` (in place) until the prompt plus the
/// answer's reserve fits `context` tokens, keeping at least the last message.
///
/// `render` builds the prompt for a message list and `encode` tokenizes it.
/// When the last message alone is too long, the prompt's oldest tokens are
/// cut so that generation can still run.
pub fn fit<E>(
    messages: &mut Vec<ChatMessage>,
    context: usize,
    max_new_tokens: usize,
    render: &dyn Fn(&[ChatMessage]) -> Result<String, E>,
    encode: &dyn Fn(&str) -> Result<Vec<u32>, E>,
) -> Result<Fit, E> {
    let reserve = reserve(max_new_tokens, context);
    let mut dropped_turns = 0;
    loop {
        let prompt = render(messages)?;
        let mut ids = encode(&prompt)?;
        if ids.len() + reserve > context && messages.len() > 1 {
            drop_oldest_turn(messages);
            dropped_turns += 1;
            continue;
        }
        let mut cut_tokens = 0;
        if ids.len() + reserve > context {
            let keep = context - reserve;
            cut_tokens = ids.len().saturating_sub(keep);
            ids.drain(..cut_tokens);
        }
        let max_new_tokens = max_new_tokens.min(context - ids.len()).max(1);
        return Ok(Fit {
            ids,
            prompt,
            dropped_turns,
            cut_tokens,
            max_new_tokens,
        });
    }
}

/// Removes the first user message and the assistant reply that follows it
/// (or a leading stray assistant message); never the last message.
fn drop_oldest_turn(messages: &mut Vec<ChatMessage>) {
    if messages.len() > 1 {
        let first_is_user = messages[0].role == "user";
        messages.remove(0);
        if first_is_user && messages.len() > 1 && messages[0].role == "assistant" {
            messages.remove(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(n_turns: usize) -> Vec<ChatMessage> {
        let mut m = Vec::new();
        for i in 0..n_turns {
            m.push(ChatMessage::new("user", format!("question {i}")));
            m.push(ChatMessage::new("assistant", format!("answer {i}")));
        }
        m.push(ChatMessage::new("user", "last"));
        m
    }

    /// One "token" per word.
    fn render(m: &[ChatMessage]) -> Result<String, ()> {
        Ok(m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join(" "))
    }

    fn encode(s: &str) -> Result<Vec<u32>, ()> {
        Ok(s.split_whitespace().enumerate().map(|(i, _)| i as u32).collect())
    }

    #[test]
    fn fitting_history_is_untouched() {
        let mut m = conv(2);
        let f = fit(&mut m, 100, 10, &render, &encode).unwrap();
        assert_eq!((f.dropped_turns, f.cut_tokens, f.max_new_tokens), (0, 0, 10));
        assert_eq!(m.len(), 5);
        assert_eq!(f.ids.len(), 9);
    }

    #[test]
    fn oldest_turns_go_first() {
        let mut m = conv(3); // 13 words
        let f = fit(&mut m, 12, 4, &render, &encode).unwrap();
        // 13 + 4 > 12 → drop turn 0 (9 words) → 9 + 4 > 12 → drop turn 1 (5 words).
        assert_eq!(f.dropped_turns, 2);
        assert_eq!(m[0].content, "question 2");
        assert_eq!(m.len(), 3);
        assert_eq!(f.max_new_tokens, 4);
    }

    #[test]
    fn a_too_long_last_message_is_cut_not_an_error() {
        let mut m = vec![
            ChatMessage::new("user", "a b"),
            ChatMessage::new("assistant", "c"),
            ChatMessage::new("user", "w ".repeat(50)),
        ];
        let f = fit(&mut m, 20, 8, &render, &encode).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(f.dropped_turns, 1);
        assert_eq!(f.cut_tokens, 50 - 12);
        assert_eq!(f.ids.len(), 12);
        assert_eq!(f.max_new_tokens, 8);
    }

    #[test]
    fn huge_max_new_tokens_reserves_half_the_context() {
        assert_eq!(reserve(10_000, 100), 50);
        assert_eq!(reserve(0, 100), 1);
        let mut m = conv(1); // 5 words
        let f = fit(&mut m, 100, 10_000, &render, &encode).unwrap();
        assert_eq!(f.dropped_turns, 0);
        assert_eq!(f.max_new_tokens, 95, "the answer may use the rest of the context");
    }
}
