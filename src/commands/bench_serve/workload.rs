//! The requests a benchmark sends: read from a JSONL file of chat requests or classification
//! inputs, or built from synthetic prompts.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::endpoint::{Api, Endpoint};

/// `max_tokens` of a chat request that sets none, when `--max-tokens` is not given either.
/// Without a limit some servers (llama.cpp's among them) generate up to the context size.
pub const DEFAULT_MAX_TOKENS: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("failed to read the prompts file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}, line {line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("the prompts file {0} has no requests")]
    Empty(PathBuf),
}

/// The request bodies of a benchmark, before the per-endpoint fields are set.
#[derive(Debug, Clone)]
pub struct Workload {
    pub api: Api,
    /// One body per prompt: chat requests without `stream`, or `{"task", "input"}` objects.
    pub bodies: Vec<Map<String, Value>>,
}

impl Workload {
    /// Reads `path`, one JSON object a line. A line is a chat request (an object with
    /// `messages`) or a classification input: an object with `input`, or a labelled example
    /// with `text` (its `label` is dropped). Blank lines are skipped; every other line must be of
    /// the kind of the first one. `task`, when given, replaces the task of every
    /// classification line, and is required for lines that name none.
    pub fn read(path: &Path, task: Option<&str>) -> Result<Self, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut api = None;
        let mut bodies = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at_line = |message: String| WorkloadError::Line {
                path: path.to_path_buf(),
                line: index + 1,
                message,
            };
            let (kind, body) = parse_line(line, task).map_err(at_line)?;
            match api {
                None => api = Some(kind),
                Some(first) if first != kind => {
                    return Err(at_line(format!(
                        "this line is a {} but the first one is a {}; use one kind per file",
                        describe(kind),
                        describe(first)
                    )))
                }
                Some(_) => {}
            }
            bodies.push(body);
        }
        match api {
            Some(api) => Ok(Self { api, bodies }),
            None => Err(WorkloadError::Empty(path.to_path_buf())),
        }
    }

    /// Builds chat requests of one user message each, or classification inputs of `task`.
    pub fn from_texts(texts: Vec<String>, task: Option<&str>) -> Self {
        match task {
            Some(task) => Self {
                api: Api::Classify,
                bodies: texts.into_iter().map(|text| classify_body(task, Value::String(text))).collect(),
            },
            None => Self {
                api: Api::Chat,
                bodies: texts
                    .into_iter()
                    .map(|text| {
                        let mut body = Map::new();
                        body.insert("messages".into(), json!([{"role": "user", "content": text}]));
                        // Greedy decoding, so that two servers of the same model produce about
                        // the same number of tokens for each prompt.
                        body.insert("temperature".into(), json!(0));
                        body
                    })
                    .collect(),
            },
        }
    }

    /// Returns the body of prompt `index` as sent to `endpoint`. Chat requests get the
    /// endpoint's model, `max_tokens` when given (else the request's own, else
    /// `DEFAULT_MAX_TOKENS`), `stream: true` and `stream_options.include_usage`.
    pub fn body_for(&self, index: usize, endpoint: &Endpoint, max_tokens: Option<u64>) -> Value {
        let mut body = self.bodies[index % self.bodies.len()].clone();
        if self.api == Api::Chat {
            if let Some(model) = &endpoint.model {
                body.insert("model".into(), json!(model));
            }
            match max_tokens {
                Some(tokens) => {
                    body.remove("max_completion_tokens");
                    body.insert("max_tokens".into(), json!(tokens));
                }
                None if !body.contains_key("max_tokens") && !body.contains_key("max_completion_tokens") => {
                    body.insert("max_tokens".into(), json!(DEFAULT_MAX_TOKENS));
                }
                None => {}
            }
            body.insert("stream".into(), json!(true));
            body.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Value::Object(body)
    }

    /// Returns whether every chat request names a model, so that no `--model` is needed.
    pub fn every_request_has_model(&self) -> bool {
        self.bodies.iter().all(|body| body.get("model").is_some_and(Value::is_string))
    }
}

fn describe(api: Api) -> &'static str {
    match api {
        Api::Chat => "chat request",
        Api::Classify => "classification input",
    }
}

fn classify_body(task: &str, input: Value) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("task".into(), json!(task));
    body.insert("input".into(), input);
    body
}

/// Parses one line into its kind and body, or returns what is wrong with it.
fn parse_line(line: &str, task: Option<&str>) -> Result<(Api, Map<String, Value>), String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut object) = value else {
        return Err("expected a JSON object".into());
    };

    if let Some(messages) = object.get("messages") {
        match messages.as_array() {
            Some(list) if !list.is_empty() => {}
            _ => return Err("`messages` must be a non-empty array".into()),
        }
        if object.get("stream").is_some_and(|stream| stream == &json!(false)) {
            return Err("`stream` is false, but chat requests are always streamed to time the first token".into());
        }
        object.remove("stream");
        object.remove("stream_options");
        return Ok((Api::Chat, object));
    }

    let input = match (object.remove("input"), object.remove("text")) {
        (Some(input), None) => input,
        (None, Some(text)) => text,
        (Some(_), Some(_)) => return Err("both `input` and `text` are set; give one".into()),
        (None, None) => {
            return Err("expected a chat request with `messages`, or a classification input with `input` or `text`".into())
        }
    };
    let valid_input = match &input {
        Value::String(_) => true,
        Value::Array(items) => !items.is_empty() && items.iter().all(Value::is_string),
        _ => false,
    };
    if !valid_input {
        return Err("the classification input must be a string or a non-empty array of strings".into());
    }
    let task = match (task, object.get("task").and_then(Value::as_str)) {
        (Some(task), _) | (None, Some(task)) => task.to_string(),
        (None, None) => return Err("the classification input names no `task`; add one or give --task".into()),
    };
    Ok((Api::Classify, classify_body(&task, input)))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn write_lines(lines: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        file.write_all(lines.as_bytes()).expect("write the prompts");
        file
    }

    fn endpoint(model: Option<&str>) -> Endpoint {
        Endpoint {
            url: "http://127.0.0.1:1".into(),
            api_url: reqwest::Url::parse("http://127.0.0.1:1/v1/chat/completions").expect("valid URL"),
            pinned: None,
            model: model.map(str::to_string),
        }
    }

    #[test]
    fn chat_lines_become_streamed_requests() {
        let file = write_lines(
            "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 5}\n\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}], \"stream\": true}\n",
        );
        let workload = Workload::read(file.path(), None).expect("valid prompts");
        assert_eq!(workload.api, Api::Chat);
        assert_eq!(workload.bodies.len(), 2);
        assert!(!workload.every_request_has_model());

        let first = workload.body_for(0, &endpoint(None), None);
        assert_eq!(first["model"], "m");
        assert_eq!(first["max_tokens"], 5);
        assert_eq!(first["stream"], true);
        assert_eq!(first["stream_options"]["include_usage"], true);

        let second = workload.body_for(1, &endpoint(Some("other")), Some(9));
        assert_eq!(second["model"], "other");
        assert_eq!(second["max_tokens"], 9);
        let default = workload.body_for(3, &endpoint(Some("x")), None);
        assert_eq!(default["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(default["messages"][0]["content"], "yo");
    }

    #[test]
    fn classification_lines_take_text_or_input() {
        let file = write_lines("{\"text\": \"great\", \"label\": \"positive\"}\n{\"input\": [\"a\", \"b\"], \"task\": \"other\"}\n");
        let workload = Workload::read(file.path(), Some("sentiment")).expect("valid inputs");
        assert_eq!(workload.api, Api::Classify);
        let bodies: Vec<Value> = workload.bodies.iter().cloned().map(Value::Object).collect();
        assert_eq!(bodies[0], json!({"task": "sentiment", "input": "great"}));
        assert_eq!(bodies[1], json!({"task": "sentiment", "input": ["a", "b"]}));
    }

    #[test]
    fn bad_lines_name_file_line_and_fault() {
        let cases = [
            ("{\"messages\": []}\n", 1, "`messages` must be a non-empty array"),
            ("\n{not json\n", 2, "invalid JSON"),
            ("[1, 2]\n", 1, "expected a JSON object"),
            ("{\"prompt\": \"x\"}\n", 1, "expected a chat request with `messages`"),
            ("{\"text\": \"x\"}\n", 1, "names no `task`"),
            ("{\"text\": 3, \"task\": \"t\"}\n", 1, "must be a string"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n{\"text\": \"x\", \"task\": \"t\"}\n", 2, "use one kind per file"),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream\": false}\n", 1, "`stream` is false"),
        ];
        for (lines, line, expected) in cases {
            let file = write_lines(lines);
            let error = Workload::read(file.path(), None).expect_err(lines);
            let message = error.to_string();
            let prefix = format!("{}, line {line}: ", file.path().display());
            assert!(message.starts_with(&prefix), "{lines:?}: {message}");
            assert!(message.contains(expected), "{lines:?}: {message}");
        }
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        let file = write_lines("\n  \n");
        assert!(matches!(Workload::read(file.path(), None), Err(WorkloadError::Empty(_))));
        let missing = Workload::read(Path::new("/nonexistent/prompts.jsonl"), None).expect_err("missing file");
        assert!(missing.to_string().contains("/nonexistent/prompts.jsonl"), "{missing}");
    }

    #[test]
    fn synthetic_texts_become_greedy_chat_or_classification() {
        let chat = Workload::from_texts(vec!["a".into()], None);
        assert_eq!(chat.api, Api::Chat);
        let body = chat.body_for(0, &endpoint(Some("m")), Some(4));
        assert_eq!(body["temperature"], 0);
        assert_eq!(body["messages"][0]["content"], "a");

        let classify = Workload::from_texts(vec!["b".into()], Some("sentiment"));
        assert_eq!(classify.api, Api::Classify);
        assert_eq!(classify.body_for(0, &endpoint(Some("m")), Some(4)), json!({"task": "sentiment", "input": "b"}));
    }
}
