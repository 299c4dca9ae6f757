//! The chat request that asks a remote model for one label of a classification task, and the
//! strict parser of its answer.

use crate::classify::task::LabelInfo;
use crate::providers::{ChatMessage, ChatRequest};

/// Completion tokens allowed beyond the longest label name, for quotes, a period or a line
/// break around it.
const ANSWER_SLACK_TOKENS: u64 = 8;

/// Characters quoted in an error message from an answer that is not a label.
const SHOWN_ANSWER_CHARS: usize = 200;

/// Quotes and backticks that the parser strips from both ends of an answer.
const QUOTES: &[char] = &['"', '\'', '`', '\u{201c}', '\u{201d}', '\u{2018}', '\u{2019}'];

/// Builds the request that asks for the label of `text`: a system message with the task and
/// the answer format, and a user message listing every label name, with its description when
/// it has one, and then the text. Greedy (temperature 0).
///
/// `max_tokens` is the longest label name in bytes plus a small slack: a byte-level BPE token
/// covers at least one byte, so the name always fits.
// NOTE: reasoning models spend completion tokens on hidden reasoning, so a limit this small
// can leave them no tokens for the answer, which then fails to parse.
pub fn label_request(task: &str, description: Option<&str>, labels: &[LabelInfo], text: &str) -> ChatRequest {
    let mut system = format!("You classify texts for the task `{task}`.");
    if let Some(description) = description.map(str::trim).filter(|d| !d.is_empty()) {
        system.push(' ');
        system.push_str(description);
    }
    system.push_str(
        "\nReply with exactly one label name from the list that the user gives, spelled as listed, \
         and nothing else: no explanation, no punctuation.",
    );

    let mut user = String::from("Labels:\n");
    for label in labels {
        match label.description.as_deref().map(str::trim).filter(|d| !d.is_empty()) {
            Some(description) => user.push_str(&format!("- {}: {description}\n", label.name)),
            None => user.push_str(&format!("- {}\n", label.name)),
        }
    }
    user.push_str("\nText:\n\"\"\"\n");
    user.push_str(text);
    user.push_str("\n\"\"\"\n\nReply with the one label name that fits the text best.");

    let longest = labels.iter().map(|label| label.name.len()).max().unwrap_or(0) as u64;
    let mut request = ChatRequest::new(vec![
        ChatMessage {
            role: "system".into(),
            content: system,
        },
        ChatMessage {
            role: "user".into(),
            content: user,
        },
    ]);
    request.max_tokens = Some(longest + ANSWER_SLACK_TOKENS);
    request.temperature = Some(0.0);
    request
}

/// An answer that names no label of the task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelParseError {
    #[error("the answer is empty")]
    Empty,
    #[error("the answer {answer:?} is not one of the labels ({labels})")]
    NotALabel { answer: String, labels: String },
    #[error("the answer {answer:?} matches the labels {matches}, which differ only in case")]
    Ambiguous { answer: String, matches: String },
}

/// Returns the index of the label that `answer` names.
///
/// The answer is trimmed, and quotes, backticks and trailing periods around it are removed.
/// What remains must equal one label name, ignoring case. When several names differ only in
/// case, the one of the same case is taken. Anything else, such as a sentence that contains a
/// label, is an error and never a guess.
pub fn parse_label(answer: &str, labels: &[LabelInfo]) -> Result<usize, LabelParseError> {
    let cleaned = strip_decoration(answer);
    if cleaned.is_empty() {
        return Err(LabelParseError::Empty);
    }
    let lowered = cleaned.to_lowercase();
    let matches: Vec<usize> = labels
        .iter()
        .enumerate()
        .filter(|(_, label)| label.name.to_lowercase() == lowered)
        .map(|(index, _)| index)
        .collect();
    match matches.as_slice() {
        [index] => Ok(*index),
        [] => Err(LabelParseError::NotALabel {
            answer: shorten(answer),
            labels: labels.iter().map(|label| label.name.as_str()).collect::<Vec<_>>().join(", "),
        }),
        several => several
            .iter()
            .copied()
            .find(|&index| labels[index].name == cleaned)
            .ok_or_else(|| LabelParseError::Ambiguous {
                answer: shorten(answer),
                matches: several.iter().map(|&index| labels[index].name.as_str()).collect::<Vec<_>>().join(", "),
            }),
    }
}

/// Removes whitespace, quotes, backticks and trailing periods around `answer`, repeatedly, so
/// that `"positive".` and `` `positive` `` both become `positive`.
fn strip_decoration(answer: &str) -> &str {
    let mut text = answer.trim();
    loop {
        let stripped = text.trim_matches(QUOTES).trim().trim_end_matches('.').trim();
        if stripped == text {
            return text;
        }
        text = stripped;
    }
}

/// Returns `answer` cut to `SHOWN_ANSWER_CHARS` characters, for an error message.
fn shorten(answer: &str) -> String {
    match answer.char_indices().nth(SHOWN_ANSWER_CHARS) {
        Some((end, _)) => format!("{}...", &answer[..end]),
        None => answer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<LabelInfo> {
        names
            .iter()
            .map(|name| LabelInfo {
                name: name.to_string(),
                description: None,
            })
            .collect()
    }

    #[test]
    fn request_lists_labels_and_text() {
        let mut labels = labels(&["positive", "negative"]);
        labels[0].description = Some("The writer likes it.".into());
        let request = label_request("sentiment", Some("Opinion of a review."), &labels, "Great film.");

        assert_eq!(request.messages.len(), 2);
        assert_eq!(request.messages[0].role, "system");
        assert!(request.messages[0].content.contains("`sentiment`. Opinion of a review."));
        assert!(request.messages[0].content.contains("exactly one label name"));
        let user = &request.messages[1];
        assert_eq!(user.role, "user");
        assert!(user.content.contains("- positive: The writer likes it.\n"), "{}", user.content);
        assert!(user.content.contains("- negative\n"), "{}", user.content);
        assert!(user.content.contains("\"\"\"\nGreat film.\n\"\"\""), "{}", user.content);
        assert_eq!(request.temperature, Some(0.0));
        assert_eq!(request.max_tokens, Some(8 + ANSWER_SLACK_TOKENS));
    }

    #[test]
    fn request_without_description() {
        let request = label_request("t", Some("  "), &labels(&["a", "b"]), "x");
        assert_eq!(
            request.messages[0].content.lines().next(),
            Some("You classify texts for the task `t`.")
        );
    }

    #[test]
    fn decorated_answers_parse() {
        let labels = labels(&["positive", "negative", "card_declined"]);
        let cases = [
            ("positive", 0),
            ("  negative\n", 1),
            ("Negative", 1),
            ("POSITIVE.", 0),
            ("\"positive\"", 0),
            ("\"positive\".", 0),
            ("'negative'", 1),
            ("`card_declined`", 2),
            ("```card_declined```", 2),
            ("\u{201c}positive\u{201d}", 0),
            ("positive...", 0),
        ];
        for (answer, expected) in cases {
            assert_eq!(parse_label(answer, &labels), Ok(expected), "{answer:?}");
        }
    }

    #[test]
    fn other_answers_are_errors() {
        let labels = labels(&["positive", "negative"]);
        for answer in [
            "The label is positive.",
            "positive, mostly",
            "positive\nnegative",
            "pos",
            "neutral",
            "**positive**",
            "positive!",
        ] {
            let error = parse_label(answer, &labels).unwrap_err();
            assert!(matches!(error, LabelParseError::NotALabel { .. }), "{answer:?}: {error:?}");
            assert!(error.to_string().contains("positive, negative"), "{error}");
        }
        for answer in ["", "  ", "\"\"", "."] {
            assert_eq!(parse_label(answer, &labels), Err(LabelParseError::Empty), "{answer:?}");
        }
    }

    #[test]
    fn labels_differing_in_case() {
        let labels = labels(&["Yes", "yes", "no"]);
        assert_eq!(parse_label("yes", &labels), Ok(1));
        assert_eq!(parse_label("Yes", &labels), Ok(0));
        assert!(matches!(parse_label("YES", &labels), Err(LabelParseError::Ambiguous { .. })));
        assert_eq!(parse_label("NO", &labels), Ok(2));
    }

    #[test]
    fn non_ascii_labels_match_ignoring_case() {
        let labels = labels(&["Ärger", "Freude"]);
        assert_eq!(parse_label("ärger", &labels), Ok(0));
    }

    #[test]
    fn long_answers_are_shortened() {
        let answer = "x".repeat(1000);
        let error = parse_label(&answer, &labels(&["a", "b"])).unwrap_err().to_string();
        assert!(error.len() < 300, "{error}");
        assert!(error.contains("..."), "{error}");
    }
}
