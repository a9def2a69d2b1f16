//! What a caller of the engine sees: stop rules, seeds, echo, logprobs, truncation,
//! cancellation. Runs on the tiny llama (no tokenizer: ids only) and on the SmolLM2
//! tokenizer for text behaviour.

mod common;

use common::fixtures;
use vicugna_engine::{
    EngineError, EngineHandle, EngineOptions, Event, FinishReason, GenerateRequest, LoadOptions, LoadedModel, Prompt,
    SamplingParams,
};

fn tiny() -> EngineHandle {
    let m = LoadedModel::load(&fixtures().join("models/tiny-llama"), &LoadOptions::default()).unwrap();
    EngineHandle::start(m, EngineOptions::default())
}

fn req(n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Ids(vec![168, 488, 80, 205, 336, 27, 40]), n);
    r.stop.ignore_eos = true;
    r
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let e = tiny();
    let sampled = |seed| {
        let mut r = req(24);
        r.sampling = SamplingParams {
            temperature: 1.5,
            seed: Some(seed),
            ..SamplingParams::greedy()
        };
        e.generate(r).unwrap().ids
    };
    assert_eq!(sampled(1), sampled(1));
    assert_ne!(sampled(1), sampled(2));
}

#[test]
fn stop_token_ids_end_with_reason_stop() {
    let e = tiny();
    let greedy = e.generate(req(16)).unwrap();
    assert_eq!(greedy.finish_reason, FinishReason::Length);
    let mut r = req(16);
    r.stop.stop_token_ids = vec![greedy.ids[3]];
    let out = e.generate(r).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.ids, greedy.ids[..4].to_vec());
    assert_eq!(out.usage.completion_tokens, 4);
    assert_eq!(out.usage.prompt_tokens, 7);
}

#[test]
fn echo_returns_the_prompt_with_logprobs() {
    let e = tiny();
    let mut r = req(2);
    r.echo = true;
    r.logprobs = Some(3);
    let mut s = e.submit(r).unwrap();
    match s.next_blocking() {
        Some(Event::Prompt { ids, logprobs, .. }) => {
            assert_eq!(ids.len(), 7);
            let lps = logprobs.expect("prompt logprobs");
            // Every prompt token but the first has a logprob, with 3 alternatives.
            assert_eq!(lps.len(), 6);
            assert!(lps.iter().all(|l| l.logprob <= 0.0 && l.top.len() == 3));
        }
        other => panic!("expected the prompt first, got {other:?}"),
    }
    let mut tokens = 0;
    while let Some(ev) = s.next_blocking() {
        match ev {
            Event::Token { logprob, .. } => {
                let lp = logprob.expect("token logprob");
                // Greedy picks the most likely token.
                assert_eq!(lp.id, lp.top[0].0);
                tokens += 1;
            }
            Event::Done { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(tokens, 2);
}

#[test]
fn prompt_over_the_context_fails_or_is_truncated_on_request() {
    let e = tiny();
    let long: Vec<u32> = (0..100_000).map(|i| 3 + i % 400).collect();
    let r = GenerateRequest::new(Prompt::Ids(long.clone()), 4);
    match e.submit(r) {
        Err(EngineError::PromptTooLong { prompt, context }) => assert_eq!((prompt, context), (100_000, 512)),
        other => panic!("expected PromptTooLong, got {:?}", other.err()),
    }
    let mut r = GenerateRequest::new(Prompt::Ids(long), 4);
    r.truncate_left = true;
    r.stop.ignore_eos = true;
    let out = e.generate(r).unwrap();
    assert_eq!(out.usage.prompt_tokens, 508);
    assert_eq!(out.ids.len(), 4);
}

#[test]
fn generation_stops_at_the_context_limit() {
    let e = tiny();
    let prompt: Vec<u32> = (0..500).map(|i| 3 + i % 400).collect();
    let mut r = GenerateRequest::new(Prompt::Ids(prompt), 100);
    r.stop.ignore_eos = true;
    let out = e.generate(r).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.usage.prompt_tokens + out.usage.completion_tokens, 512);
}

#[test]
fn dropping_the_stream_cancels_and_the_engine_keeps_serving() {
    let e = tiny();
    let mut s = e.submit(req(400)).unwrap();
    assert!(matches!(s.next_blocking(), Some(Event::Token { .. })));
    drop(s);
    assert_eq!(e.generate(req(3)).unwrap().ids.len(), 3);
}

#[test]
fn invalid_requests_are_refused_before_queueing() {
    let e = tiny();
    let mut r = req(4);
    r.sampling.temperature = -1.0;
    let err = e.submit(r).err().unwrap().to_string();
    assert!(err.contains("temperature must be >= 0, got -1"), "{err}");
    let err = e
        .submit(GenerateRequest::new(Prompt::Ids(vec![9999]), 4))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("9999") && err.contains("512"), "{err}");
}

/// Requests submitted together each get the tokens they get alone; if one is
/// invalid, the call fails and none of them runs.
#[test]
fn requests_submitted_together_get_their_own_tokens() {
    let e = tiny();
    let prompts = [vec![168, 488, 80, 205], vec![7, 300, 12], vec![400, 401, 402, 403, 404]];
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .map(|p| {
            let mut r = GenerateRequest::new(Prompt::Ids(p.clone()), 10);
            r.stop.ignore_eos = true;
            r
        })
        .collect();
    let alone: Vec<Vec<u32>> = reqs.iter().map(|r| e.generate(r.clone()).unwrap().ids).collect();
    let streams = e.submit_together(reqs.clone()).unwrap();
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut ids = Vec::new();
        while let Some(ev) = s.next_blocking() {
            match ev {
                Event::Token { id, .. } => ids.push(id),
                Event::Done { .. } => break,
                Event::Error(err) => panic!("request {i}: {err}"),
                Event::Prompt { .. } => {}
            }
        }
        assert_eq!(ids, alone[i], "request {i}");
    }
    let mut bad = reqs;
    bad.push(GenerateRequest::new(Prompt::Ids(vec![9999]), 4));
    let err = e.submit_together(bad).err().unwrap().to_string();
    assert!(err.contains("9999"), "{err}");
}
