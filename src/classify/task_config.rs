//! Classification tasks as configured: labels, backends, threshold and input limit.
//!
//! Tasks come from `[[task]]` tables of the config file, or from the built-in set in
//! `builtin_tasks.toml` when the config defines none. Relative paths in a task are resolved
//! against the models directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The built-in tasks: `sentiment`, `intent` and `route`.
pub const BUILTIN_TASKS: &str = include_str!("builtin_tasks.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Confidence below which a result counts as unsure and is marked for escalation.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Maximum input length, in tokens of each backend's tokenizer.
    #[serde(default = "default_max_input_tokens")]
    pub max_input_tokens: usize,
    #[serde(default)]
    pub on_overflow: Overflow,
    /// The labels; a task without labels takes them from its first head file.
    #[serde(default, rename = "label")]
    pub labels: Vec<LabelConfig>,
    /// Backends tried in order: an input moves to the next backend while the current one's
    /// confidence is below its `accept` level, and the last backend's result is always kept.
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Remote models asked to pick the label of a result below `threshold`.
    #[serde(default)]
    pub escalate: Option<crate::routing::config::EscalationConfig>,
    /// Set on the built-in tasks, which are left out rather than failing the start when a
    /// model or file they use is missing.
    #[serde(skip)]
    pub builtin: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Inputs over `max_input_tokens` get a 400 error.
    #[default]
    Reject,
    /// Inputs are cut to `max_input_tokens`, and the result reports it.
    Truncate,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelConfig {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Example inputs: few-shot examples in LLM prompts, and the training data of a head
    /// that has no file and no `train_data`.
    #[serde(default)]
    pub examples: Vec<String>,
    /// Words an LLM writes for this label; the name with `_` replaced by spaces by default.
    #[serde(default)]
    pub text: Option<String>,
}

impl LabelConfig {
    pub fn llm_text(&self) -> String {
        self.text.clone().unwrap_or_else(|| self.name.replace('_', " "))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// Sentence-encoder embeddings and a linear softmax head.
    EmbeddingHead {
        encoder: String,
        /// Head file (safetensors). When it is missing, the head is trained at start from
        /// `train_data`, or from the labels' examples, and written there.
        #[serde(default)]
        head: Option<PathBuf>,
        /// JSONL files of `{"text", "label"}` lines to train the head on when `head` is missing.
        #[serde(default)]
        train_data: Vec<PathBuf>,
        #[serde(default)]
        accept: Option<f64>,
        /// Divides the logits before the softmax; above 1 lowers confidence.
        #[serde(default = "default_temperature")]
        temperature: f64,
        /// L2 penalty used when the head is trained at start.
        #[serde(default)]
        l2: Option<f64>,
    },
    /// A GGUF language model scoring each label's tokens after a prompt.
    LlmLabels {
        model: String,
        /// `chat` wraps the prompt in the model's chat template; `plain` suits base models.
        #[serde(default)]
        format: PromptFormat,
        /// Jinja template of the prompt; see `prompt.rs` for the variables and defaults.
        #[serde(default)]
        prompt: Option<String>,
        /// System message for `chat` prompts.
        #[serde(default)]
        system: Option<String>,
        /// Text placed before each label, after the prompt; `" "` for `plain` by default.
        #[serde(default)]
        label_prefix: Option<String>,
        /// Few-shot examples taken from each label's `examples`, at most this many per label.
        #[serde(default = "default_shots")]
        shots: usize,
        #[serde(default)]
        accept: Option<f64>,
        /// Divides the label log-probabilities before the softmax.
        #[serde(default = "default_temperature")]
        temperature: f64,
    },
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::EmbeddingHead { .. } => "embedding_head",
            BackendConfig::LlmLabels { .. } => "llm_labels",
        }
    }

    pub fn accept(&self) -> Option<f64> {
        match self {
            BackendConfig::EmbeddingHead { accept, .. } | BackendConfig::LlmLabels { accept, .. } => *accept,
        }
    }

    /// Name of the encoder or model the backend runs.
    pub fn model(&self) -> &str {
        match self {
            BackendConfig::EmbeddingHead { encoder, .. } => encoder,
            BackendConfig::LlmLabels { model, .. } => model,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    #[default]
    Chat,
    Plain,
}

fn default_threshold() -> f64 {
    0.5
}

fn default_max_input_tokens() -> usize {
    256
}

fn default_temperature() -> f64 {
    1.0
}

fn default_shots() -> usize {
    2
}

#[derive(Debug, Deserialize)]
struct TaskFile {
    #[serde(rename = "task")]
    tasks: Vec<TaskConfig>,
}

/// Parses the built-in tasks.
pub fn builtin_tasks() -> Result<Vec<TaskConfig>, String> {
    let mut tasks = toml::from_str::<TaskFile>(BUILTIN_TASKS)
        .map(|file| file.tasks)
        .map_err(|e| format!("built-in task file: {e}"))?;
    for task in &mut tasks {
        task.builtin = true;
    }
    Ok(tasks)
}

impl TaskConfig {
    /// Checks the values that parsing cannot; the message names the task and the field.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if name.trim().is_empty() {
            return Err("a task has an empty `name`".into());
        }
        let in_unit = |value: f64| (0.0..=1.0).contains(&value);
        if !in_unit(self.threshold) {
            return Err(format!("task `{name}`: `threshold` must be within 0..=1, got {}", self.threshold));
        }
        if self.max_input_tokens == 0 {
            return Err(format!("task `{name}`: `max_input_tokens` must be at least 1"));
        }
        if self.backends.is_empty() {
            return Err(format!("task `{name}`: needs at least one [[task.backend]]"));
        }
        let mut seen = std::collections::HashSet::new();
        for label in &self.labels {
            if label.name.trim().is_empty() {
                return Err(format!("task `{name}`: a label has an empty `name`"));
            }
            if !seen.insert(label.name.as_str()) {
                return Err(format!("task `{name}`: label `{}` is listed twice", label.name));
            }
        }
        if !self.labels.is_empty() && self.labels.len() < 2 {
            return Err(format!("task `{name}`: needs at least two labels"));
        }
        for (index, backend) in self.backends.iter().enumerate() {
            let at = format!("task `{name}`, backend {index} ({})", backend.kind());
            if let Some(accept) = backend.accept() {
                if !in_unit(accept) {
                    return Err(format!("{at}: `accept` must be within 0..=1, got {accept}"));
                }
            }
            match backend {
                BackendConfig::EmbeddingHead {
                    temperature, l2, ..
                } => {
                    check_temperature(&at, *temperature)?;
                    if l2.is_some_and(|l2| !(l2.is_finite() && l2 >= 0.0)) {
                        return Err(format!("{at}: `l2` must be a finite number >= 0"));
                    }
                }
                BackendConfig::LlmLabels { temperature, .. } => {
                    check_temperature(&at, *temperature)?;
                    if self.labels.is_empty() {
                        return Err(format!("{at}: an llm_labels backend needs the task's labels listed"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Resolves relative head and data paths against `models_dir`.
    pub fn resolve_paths(&mut self, models_dir: &Path) {
        for backend in &mut self.backends {
            if let BackendConfig::EmbeddingHead {
                head, train_data, ..
            } = backend
            {
                if let Some(path) = head {
                    *path = resolve(models_dir, path);
                }
                for path in train_data {
                    *path = resolve(models_dir, path);
                }
            }
        }
    }
}

fn check_temperature(at: &str, temperature: f64) -> Result<(), String> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(format!("{at}: `temperature` must be a finite number > 0, got {temperature}"))
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> TaskConfig {
        let mut file: TaskFile = toml::from_str(text).expect("valid task TOML");
        file.tasks.remove(0)
    }

    #[test]
    fn builtin_tasks_are_valid() {
        let tasks = builtin_tasks().unwrap();
        let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["sentiment", "intent", "route"]);
        for task in &tasks {
            task.validate().unwrap();
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        let base = "[[task]]\nname = \"t\"\n[[task.label]]\nname = \"a\"\n[[task.label]]\nname = \"b\"\n";
        let cases = [
            ("threshold = 1.5", "threshold"),
            ("max_input_tokens = 0", "max_input_tokens"),
        ];
        for (line, field) in cases {
            let text = base.replacen("name = \"t\"\n", &format!("name = \"t\"\n{line}\n"), 1)
                + "[[task.backend]]\nkind = \"embedding_head\"\nencoder = \"e\"\n";
            let error = parse(&text).validate().unwrap_err();
            assert!(error.contains(field), "{error}");
        }
        let text = format!("{base}[[task.backend]]\nkind = \"llm_labels\"\nmodel = \"m\"\ntemperature = 0.0\n");
        let error = parse(&text).validate().unwrap_err();
        assert!(error.contains("temperature"), "{error}");
        let text = format!("{base}[[task.backend]]\nkind = \"embedding_head\"\nencoder = \"e\"\naccept = -1\n");
        let error = parse(&text).validate().unwrap_err();
        assert!(error.contains("accept"), "{error}");
    }

    #[test]
    fn duplicate_label_rejected() {
        let text = "[[task]]\nname = \"t\"\n[[task.label]]\nname = \"a\"\n[[task.label]]\nname = \"a\"\n\
                    [[task.backend]]\nkind = \"embedding_head\"\nencoder = \"e\"\n";
        let error = parse(text).validate().unwrap_err();
        assert!(error.contains("twice"), "{error}");
    }

    #[test]
    fn unknown_backend_field_rejected() {
        let text = "[[task]]\nname = \"t\"\n[[task.backend]]\nkind = \"embedding_head\"\nencoder = \"e\"\nheed = \"x\"\n";
        assert!(toml::from_str::<TaskFile>(text).is_err());
    }
}
