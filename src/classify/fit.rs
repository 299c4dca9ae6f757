//! Fitting a head: embed labelled texts with an encoder, then train a logistic regression.

use super::dataset::Example;
use super::encoder::SentenceEncoder;
use super::head::Head;
use super::train::{train, TrainOptions, TrainReport};

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("{origin}: label `{label}` is not one of the task's labels ({known})")]
    UnknownLabel {
        origin: String,
        label: String,
        known: String,
    },
    #[error("label `{0}` has no examples to train on")]
    MissingLabel(String),
    #[error("encoder: {0}")]
    Encoder(#[from] super::encoder::EncoderError),
    #[error("training failed: {0}")]
    Train(String),
}

/// Trains a head for `labels` on `examples`, embedding them with `encoder`; inputs longer
/// than `max_input_tokens` are truncated as the task would truncate them.
pub fn fit_head(
    encoder: &SentenceEncoder,
    encoder_id: &str,
    labels: &[String],
    examples: &[Example],
    max_input_tokens: usize,
    options: &TrainOptions,
) -> Result<(Head, TrainReport), FitError> {
    let mut targets = Vec::with_capacity(examples.len());
    for (index, example) in examples.iter().enumerate() {
        let class = labels
            .iter()
            .position(|label| *label == example.label)
            .ok_or_else(|| FitError::UnknownLabel {
                origin: example.describe(index),
                label: example.label.clone(),
                known: labels.join(", "),
            })?;
        targets.push(class);
    }
    for (class, label) in labels.iter().enumerate() {
        if !targets.contains(&class) {
            return Err(FitError::MissingLabel(label.clone()));
        }
    }

    let limit = max_input_tokens.min(encoder.max_tokens - 2) + 2;
    let mut inputs = Vec::with_capacity(examples.len());
    for example in examples {
        let text: String = unicode_normalization::UnicodeNormalization::nfc(example.text.as_str()).collect();
        let mut tokens = encoder.tokenize(&text)?;
        SentenceEncoder::truncate(&mut tokens, limit);
        inputs.push(tokens);
    }
    let embeddings = encoder.embed(&inputs)?;
    let features: Vec<f32> = embeddings.concat();

    let (model, report) = train(&features, &targets, labels.len(), encoder.dim, options)
        .map_err(|e| FitError::Train(e.to_string()))?;
    let head = Head {
        labels: labels.to_vec(),
        model,
        encoder: Some(encoder_id.to_string()),
    };
    Ok((head, report))
}
