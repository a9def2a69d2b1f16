//! Constrained decoding (a choice list, a regex) and prefix-cache reuse, on the
//! default model with its real tokenizer.

mod common;

use common::default_gguf;
use vicugna_engine::{
    Constraint, EngineError, EngineHandle, EngineOptions, FinishReason, GenerateRequest, LoadOptions, LoadedModel,
    Prompt, SamplingParams,
};

fn engine(prefix_cache: bool) -> EngineHandle {
    let loaded = LoadedModel::load(&default_gguf(), &LoadOptions::default()).expect("load the default GGUF");
    EngineHandle::start(
        loaded,
        EngineOptions {
            prefix_cache,
            ..EngineOptions::default()
        },
    )
}

fn chat(question: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
}

fn sampled(prompt: &str, constraint: Constraint, seed: u64) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Text(prompt.into()), 40);
    r.add_special_tokens = false;
    r.sampling = SamplingParams {
        temperature: 1.3,
        seed: Some(seed),
        ..SamplingParams::greedy()
    };
    r.constraint = Some(constraint);
    r
}

#[test]
fn choice_constraint_always_gives_one_of_the_labels() {
    let e = engine(true);
    let labels = vec![
        "positive".to_string(),
        "negative".to_string(),
        "mixed feelings".to_string(),
    ];
    let prompt = chat("Review: \"The battery died after two days.\" Is this review positive or negative?");
    let mut seen = std::collections::HashSet::new();
    for seed in 0..12 {
        let out = e
            .generate(sampled(&prompt, Constraint::Choice(labels.clone()), seed))
            .unwrap();
        assert!(labels.contains(&out.text), "seed {seed}: {:?} is not a label", out.text);
        assert_eq!(out.finish_reason, FinishReason::Stop);
        seen.insert(out.text);
    }
    // At a high temperature more than one label comes up: the mask does not
    // collapse the distribution to one answer.
    assert!(seen.len() >= 2, "only {seen:?}");
}

#[test]
fn regex_constraint_shapes_free_text() {
    let e = engine(true);
    let prompt = chat("Rate the answer \"Paris is the capital of France\" from 1 to 10.");
    for seed in 0..6 {
        let out = e
            .generate(sampled(
                &prompt,
                Constraint::Regex(r"Rating: \[\[(10|[1-9])\]\]".into()),
                seed,
            ))
            .unwrap();
        let n: u32 = out
            .text
            .strip_prefix("Rating: [[")
            .and_then(|t| t.strip_suffix("]]"))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("seed {seed}: {:?} does not match", out.text));
        assert!((1..=10).contains(&n));
    }
}

#[test]
fn a_bad_pattern_is_refused_before_queueing() {
    let e = engine(true);
    let err = e
        .submit(sampled("x", Constraint::Regex("([a-z]".into()), 0))
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
    assert!(err.to_string().contains("constraint pattern"), "{err}");
    let err = e.submit(sampled("x", Constraint::Choice(vec![]), 0)).err().unwrap();
    assert!(err.to_string().contains("choice list is empty"), "{err}");
}

#[test]
fn reused_prefix_gives_the_same_tokens_as_a_full_prefill() {
    let instruction = "Classify the topic of the news text as business, sport, politics, tech or entertainment. \
                       Answer with one word.\n\n";
    let texts = [
        "The central bank raised interest rates by half a point.",
        "The striker scored twice in the cup final.",
    ];
    let run = |e: &EngineHandle, text: &str| {
        let mut r = GenerateRequest::new(Prompt::Text(chat(&format!("{instruction}Text: {text}"))), 12);
        r.add_special_tokens = false;
        r.logprobs = Some(0);
        e.generate(r).unwrap()
    };
    let cold = engine(false);
    let warm = engine(true);
    for text in texts {
        let want = run(&cold, text);
        let got = run(&warm, text);
        assert_eq!(got.ids, want.ids, "{text}");
        // The same positions are computed in differently sized batches (the whole
        // prompt, or the part after the reused prefix), whose products round
        // differently: logprobs agree to rounding (measured up to 1.4e-3), not bits.
        for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
            assert!(
                (a.logprob - b.logprob).abs() < 3e-3,
                "{text}: {} vs {}",
                a.logprob,
                b.logprob
            );
        }
    }
    assert_eq!(cold.stats().reused_prompt_tokens, 0);
    let stats = warm.stats();
    // The second text shares the system prompt and the instruction with the first.
    assert!(stats.reused_prompt_tokens >= 40, "{stats:?}");
    assert!(stats.reused_prompt_tokens < stats.prompt_tokens);
}

#[test]
fn a_long_prompt_attended_in_blocks_equals_token_by_token() {
    let with_chunk = |prefill_chunk| {
        let loaded = LoadedModel::load(&default_gguf(), &LoadOptions::default()).unwrap();
        EngineHandle::start(
            loaded,
            EngineOptions {
                prefill_chunk,
                prefix_cache: false,
                ..EngineOptions::default()
            },
        )
    };
    // Over two query blocks of prompt attention.
    let text = "The river carried boats past farms and mills to the sea. ".repeat(24);
    let run = |e: &EngineHandle| {
        let mut r = GenerateRequest::new(Prompt::Text(text.clone()), 6);
        r.logprobs = Some(0);
        r.stop.ignore_eos = true;
        e.generate(r).unwrap()
    };
    let whole = run(&with_chunk(512));
    let stepped = run(&with_chunk(1));
    assert!(whole.usage.prompt_tokens > 256, "{}", whole.usage.prompt_tokens);
    assert_eq!(whole.ids, stepped.ids);
    for (a, b) in whole.logprobs.iter().zip(&stepped.logprobs) {
        assert!((a.logprob - b.logprob).abs() < 1e-3, "{} vs {}", a.logprob, b.logprob);
    }
}

/// A long prompt prefilled in budget-sized slices beside a decoding request gets
/// the tokens it gets alone (in 512-token chunks), and the decoding request is
/// not held up: it keeps getting tokens while the prompt is prefilled.
#[test]
fn a_prompt_sliced_beside_decoding_requests_gets_its_tokens_alone() {
    let e = engine(false);
    let text = "The river carried boats past farms and mills to the sea. ".repeat(60);
    let long = || {
        let mut r = GenerateRequest::new(Prompt::Text(text.clone()), 6);
        r.logprobs = Some(0);
        r.stop.ignore_eos = true;
        r
    };
    let alone = e.generate(long()).unwrap();
    assert!(alone.usage.prompt_tokens > 600, "{}", alone.usage.prompt_tokens);
    let mut background = GenerateRequest::new(Prompt::Text(chat("Tell me a story.")), 400);
    background.stop.ignore_eos = true;
    let mut bg = e.submit(background).unwrap();
    // The background request decodes before the long prompt arrives.
    assert!(matches!(bg.next_blocking(), Some(vicugna_engine::Event::Token { .. })));
    let mut s = e.submit(long()).unwrap();
    let mut ids = Vec::new();
    let mut logprobs = Vec::new();
    let mut bg_tokens = 0;
    loop {
        match s.next_blocking() {
            Some(vicugna_engine::Event::Token { id, logprob, .. }) => {
                ids.push(id);
                logprobs.extend(logprob);
            }
            Some(vicugna_engine::Event::Done { .. }) => break,
            other => panic!("{other:?}"),
        }
    }
    while bg.try_next().is_some() {
        bg_tokens += 1;
    }
    assert_eq!(ids, alone.ids);
    for (a, b) in logprobs.iter().zip(&alone.logprobs) {
        assert!((a.logprob - b.logprob).abs() < 1e-3, "{} vs {}", a.logprob, b.logprob);
    }
    // Several steps of slices: the background request decoded a token in each.
    assert!(
        bg_tokens >= 5,
        "the decoding request got {bg_tokens} tokens while the prompt was prefilled"
    );
}
