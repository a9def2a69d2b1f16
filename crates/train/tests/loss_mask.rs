//! Loss masks with the real SmolLM2 tokenizer: for several templates, the tokens
//! that carry labels decode to exactly the assistant turns plus their end markers.

use std::path::PathBuf;

use vicugna_chat::ChatFormat;
use vicugna_engine::tokenizer::Tokenizer;
use vicugna_train::data::{Sample, Turn};
use vicugna_train::mask::Masker;

fn tokenizer() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/smollm2-tokenizer");
    Tokenizer::from_hf_dir(&dir).expect("SmolLM2 tokenizer fixture")
}

fn sample() -> Sample {
    let t = |from: &str, value: &str| Turn {
        from: from.into(),
        value: value.into(),
    };
    Sample {
        id: "s1".into(),
        conversations: vec![
            t("human", "What is 2+2? Answer briefly."),
            t("gpt", "2+2 is 4."),
            t("human", "And in French?\nPlease spell it."),
            t("gpt", "Quatre — it's spelled q-u-a-t-r-e.\n\n```\nquatre\n```"),
        ],
    }
}

/// Contiguous runs of labelled tokens.
fn runs(labels: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        if labels[i] {
            let s = i;
            while i < labels.len() && labels[i] {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

fn check(format: ChatFormat, marker: &str) {
    let tok = tokenizer();
    let s = sample();
    let masker = Masker::new(&format, &tok, None);
    let enc = masker.encode(&s, None).expect("encode");
    let answers: Vec<&str> = s
        .conversations
        .iter()
        .skip(1)
        .step_by(2)
        .map(|t| t.value.as_str())
        .collect();
    let got = runs(&enc.labels);
    assert_eq!(
        got.len(),
        answers.len(),
        "{}: one labelled run per assistant turn:\n{}",
        format.name(),
        enc.text
    );
    for ((a, b), answer) in got.iter().zip(&answers) {
        let text = tok.decode(&enc.ids[*a..*b], false).expect("decode");
        // A token may carry the space between the role name and the answer.
        assert_eq!(
            text.trim_start(),
            format!("{answer}{marker}"),
            "{}: labelled tokens must decode to the answer and its end marker",
            format.name()
        );
    }
    // Nothing of the user's turns or the template is labelled.
    let labelled: String = enc
        .ids
        .iter()
        .zip(&enc.labels)
        .filter(|(_, &l)| l)
        .map(|(&id, _)| tok.decode(&[id], false).unwrap())
        .collect();
    assert!(!labelled.contains("French?"), "{}: user text labelled", format.name());
    // The whole prompt is tokenized once: its ids equal tokenizing the rendered text.
    let again = tok.encode(&enc.text, format.add_special_tokens()).unwrap();
    assert_eq!(again, enc.ids);
}

#[test]
fn model_chat_template_labels_answers_and_im_end() {
    let tok = tokenizer();
    let format = ChatFormat::select(
        None,
        Some((
            tok.chat_template().unwrap(),
            tok.bos_token().unwrap_or(""),
            tok.eos_token().unwrap_or(""),
        )),
        "smollm2",
    )
    .unwrap();
    check(format, "<|im_end|>");
}

#[test]
fn vicuna_labels_answers_and_eos() {
    check(ChatFormat::named("vicuna_v1.1").unwrap(), "</s>");
}

#[test]
fn zephyr_labels_answers_and_eos() {
    check(ChatFormat::named("zephyr").unwrap(), "</s>");
}

#[test]
fn chatml_style_labels_answers_and_im_end() {
    check(ChatFormat::named("mpt-7b-chat").unwrap(), "<|im_end|>");
}

#[test]
fn one_shot_masks_the_few_shot_example_and_labels_the_stop_string() {
    check(ChatFormat::named("one_shot").unwrap(), "\n###");
}

#[test]
fn truncation_keeps_labels_aligned() {
    let tok = tokenizer();
    let format = ChatFormat::named("vicuna_v1.1").unwrap();
    let masker = Masker::new(&format, &tok, None);
    let full = masker.encode(&sample(), None).unwrap();
    let cut = masker.encode(&sample(), Some(full.ids.len() - 5)).unwrap();
    assert_eq!(cut.truncated, 5);
    assert_eq!(&full.labels[..cut.ids.len()], &cut.labels[..]);
}

#[test]
fn unknown_speaker_is_a_clear_error() {
    let tok = tokenizer();
    let format = ChatFormat::named("vicuna_v1.1").unwrap();
    let mut s = sample();
    s.conversations[1].from = "narrator".into();
    let err = Masker::new(&format, &tok, None)
        .encode(&s, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("s1") && err.contains("narrator"), "{err}");
}
