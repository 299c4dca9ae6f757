//! Prompts for LLM label scoring: a Jinja template rendered with the task, its labels,
//! few-shot examples and the input.
//!
//! Template variables: `task.name`, `task.description`, `labels` (each with `name`, `text`
//! and `description`), `examples` (each with `text` and `label`, the label's LLM text) and
//! `input`. With `format = "chat"` the rendered text is the user message of the model's chat
//! template and the label follows the assistant turn's opening. With `format = "plain"` it is
//! the whole prompt, and the label follows it after `label_prefix` (a space by default).

use minijinja::Environment;
use serde::Serialize;

use super::task_config::PromptFormat;

const CHAT_PROMPT: &str = "{{ task.description }}
Choose one label: {{ labels | map(attribute='text') | join(', ') }}.
{% for label in labels %}{% if label.description %}- {{ label.text }}: {{ label.description }}
{% endif %}{% endfor %}{% if examples %}
Examples:
{% for example in examples %}Text: {{ example.text }}
Label: {{ example.label }}
{% endfor %}{% endif %}
Reply with the label only.

Text: {{ input }}";

const PLAIN_PROMPT: &str = "{{ task.description }}
{% for example in examples %}
Text: {{ example.text }}
Label: {{ example.label }}
{% endfor %}
Text: {{ input }}
Label:";

const TEMPLATE_NAME: &str = "prompt";

#[derive(Debug, Clone, Serialize)]
pub struct PromptTask {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptLabel {
    pub name: String,
    pub text: String,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptExample {
    pub text: String,
    pub label: String,
}

/// A compiled prompt template with the parts that stay the same for every input.
pub struct PromptTemplate {
    env: Environment<'static>,
    task: PromptTask,
    labels: Vec<PromptLabel>,
    examples: Vec<PromptExample>,
}

impl PromptTemplate {
    /// Compiles `source`, or the default template of `format`.
    pub fn new(
        source: Option<&str>,
        format: PromptFormat,
        task: PromptTask,
        labels: Vec<PromptLabel>,
        examples: Vec<PromptExample>,
    ) -> Result<Self, minijinja::Error> {
        let source = source.unwrap_or(match format {
            PromptFormat::Chat => CHAT_PROMPT,
            PromptFormat::Plain => PLAIN_PROMPT,
        });
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())?;
        check_variables(&env)?;
        Ok(Self {
            env,
            task,
            labels,
            examples,
        })
    }

    pub fn render(&self, input: &str) -> Result<String, minijinja::Error> {
        self.env.get_template(TEMPLATE_NAME)?.render(minijinja::context! {
            task => &self.task,
            labels => &self.labels,
            examples => &self.examples,
            input => input,
        })
    }
}

/// Variables a prompt template can use.
const VARIABLES: [&str; 4] = ["task", "labels", "examples", "input"];

/// Rejects a template that reads a variable tierd does not provide. Strict mode alone does not
/// catch every case: a filter such as `join` accepts an undefined value and prints nothing.
fn check_variables(env: &Environment<'static>) -> Result<(), minijinja::Error> {
    let template = env.get_template(TEMPLATE_NAME)?;
    let globals: Vec<&str> = env.globals().map(|(name, _)| name).collect();
    let mut unknown: Vec<String> = template
        .undeclared_variables(false)
        .into_iter()
        .filter(|name| !VARIABLES.contains(&name.as_str()) && !globals.contains(&name.as_str()))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    Err(minijinja::Error::new(
        minijinja::ErrorKind::UndefinedError,
        format!(
            "the template uses unknown variable(s) `{}`; the variables are {}",
            unknown.join("`, `"),
            VARIABLES.join(", ")
        ),
    ))
}

/// Picks up to `shots` examples per label, interleaved across labels so that no label's
/// examples all come last, where a small model would copy the most recent label.
pub fn interleave_examples(per_label: &[(String, Vec<String>)], shots: usize) -> Vec<PromptExample> {
    let mut examples = Vec::new();
    // Rounds past the longest example list add nothing, and `shots` comes from the config.
    let rounds = per_label.iter().map(|(_, texts)| texts.len()).max().unwrap_or(0).min(shots);
    for round in 0..rounds {
        for (label, texts) in per_label {
            if let Some(text) = texts.get(round) {
                examples.push(PromptExample {
                    text: text.clone(),
                    label: label.clone(),
                });
            }
        }
    }
    examples
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(format: PromptFormat, examples: Vec<PromptExample>) -> PromptTemplate {
        let labels = ["positive", "negative"]
            .map(|name| PromptLabel {
                name: name.into(),
                text: name.into(),
                description: Some(format!("{name} opinion")),
            })
            .to_vec();
        let task = PromptTask {
            name: "sentiment".into(),
            description: "Sentiment of a review.".into(),
        };
        PromptTemplate::new(None, format, task, labels, examples).unwrap()
    }

    #[test]
    fn plain_prompt_ends_before_label() {
        let examples = interleave_examples(
            &[
                ("positive".into(), vec!["Great.".into(), "Loved it.".into()]),
                ("negative".into(), vec!["Awful.".into()]),
            ],
            2,
        );
        let text = template(PromptFormat::Plain, examples).render("Not bad at all").unwrap();
        assert_eq!(
            text,
            "Sentiment of a review.\n\nText: Great.\nLabel: positive\n\nText: Awful.\nLabel: negative\n\n\
             Text: Loved it.\nLabel: positive\n\nText: Not bad at all\nLabel:"
        );
    }

    #[test]
    fn chat_prompt_lists_labels() {
        let text = template(PromptFormat::Chat, Vec::new()).render("Meh").unwrap();
        assert!(text.contains("Choose one label: positive, negative."), "{text}");
        assert!(text.contains("- negative: negative opinion"), "{text}");
        assert!(text.ends_with("Text: Meh"), "{text}");
    }

    #[test]
    fn unknown_variable_is_rejected_at_load() {
        for source in ["{{ nope }}", "{{ input }} {{ lables | join(', ') }}"] {
            let task = PromptTask {
                name: "t".into(),
                description: String::new(),
            };
            let error = PromptTemplate::new(Some(source), PromptFormat::Plain, task, Vec::new(), Vec::new())
                .err()
                .expect("an unknown variable must be rejected");
            let message = error.to_string();
            assert!(message.contains("nope") || message.contains("lables"), "{message}");
        }
    }

    #[test]
    fn known_variables_and_globals_are_accepted() {
        let task = PromptTask {
            name: "t".into(),
            description: String::new(),
        };
        let source = "{% for i in range(2) %}{{ i }}{% endfor %}{{ task.name }}{{ labels | length }}{{ examples | length }}{{ input }}";
        let template = PromptTemplate::new(Some(source), PromptFormat::Plain, task, Vec::new(), Vec::new()).unwrap();
        assert_eq!(template.render("x").unwrap(), "01t00x");
    }

    #[test]
    fn huge_shots_stop_at_longest_list() {
        let per_label = [("a".to_string(), vec!["1".to_string()]), ("b".to_string(), vec![])];
        let examples = interleave_examples(&per_label, usize::MAX);
        assert_eq!(examples.len(), 1);
    }
}
