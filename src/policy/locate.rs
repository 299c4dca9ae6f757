//! Finds the line of the config field that a validation message names, so that an invalid
//! reload is logged with its place in the file.
//!
//! Messages name fields in two forms, both quoted in backticks: a path such as
//! `workflow[0].max_prompt_tokens` or `pricing.baseline`, or an entry and a field such as
//! task `sentiment`: `threshold`, where the entry is found by its `name` (or a model's `id`).

use regex::Regex;
use toml_edit::{ImDocument, Item};

/// Returns the 1-based line of the field that `message` names in the TOML `text`. A field not
/// written in the file gives its table's line, and a message without a known field gives `None`.
pub fn line_of(text: &str, message: &str) -> Option<usize> {
    let document = ImDocument::parse(text).ok()?;
    let offset = entry_field(&document, message).or_else(|| quoted_path(&document, message))?;
    Some(text[..offset.min(text.len())].matches('\n').count() + 1)
}

/// Resolves the "entry `NAME`: `field`" form.
fn entry_field(document: &ImDocument<&str>, message: &str) -> Option<usize> {
    let pattern = Regex::new(r"\b(task|route|provider|model) `([^`]+)`(?:[^`]*?`([A-Za-z_.]+)`)?").ok()?;
    let captures = pattern.captures(message)?;
    let table = captures.get(1)?.as_str();
    let name = captures.get(2)?.as_str();
    let key = if table == "model" { "id" } else { "name" };
    let entries = document.get(table)?.as_array_of_tables()?;
    let entry = entries
        .iter()
        .find(|entry| entry.get(key).and_then(Item::as_str) == Some(name))?;
    let field = captures.get(3).map(|m| m.as_str());
    field
        .and_then(|field| walk_table(entry, field))
        .and_then(Item::span)
        .or_else(|| entry.span())
        .map(|span| span.start)
}

/// Walks the dotted `path` from `table`.
fn walk_table<'a>(table: &'a toml_edit::Table, path: &str) -> Option<&'a Item> {
    let mut parts = path.split('.');
    let mut item = table.get(parts.next()?)?;
    for part in parts {
        item = item.get(part)?;
    }
    Some(item)
}

/// Resolves a backticked path such as `workflow[0].max_prompt_tokens`.
fn quoted_path(document: &ImDocument<&str>, message: &str) -> Option<usize> {
    message
        .split('`')
        .skip(1)
        .step_by(2)
        .find_map(|path| resolve_path(document.as_table(), path))
}

/// Returns the offset of `path` in `table`: dotted keys, each optionally indexing an array of
/// tables, as in `client_key[1].sha256`.
fn resolve_path(table: &toml_edit::Table, path: &str) -> Option<usize> {
    let (head, rest) = match path.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (path, None),
    };
    let (key, index) = match head.split_once('[') {
        Some((key, index)) => (key, Some(index.strip_suffix(']')?.parse::<usize>().ok()?)),
        None => (head, None),
    };
    let item = table.get(key)?;
    let inner: Option<&toml_edit::Table> = match (item, index) {
        (Item::ArrayOfTables(tables), Some(index)) => Some(tables.get(index)?),
        (Item::Table(inner), None) => Some(inner),
        (_, Some(_)) => return None,
        (_, None) => None,
    };
    match (rest, inner) {
        (Some(rest), Some(inner)) => resolve_path(inner, rest).or_else(|| inner.span().map(|span| span.start)),
        (Some(_), None) => None,
        (None, Some(inner)) => inner.span().map(|span| span.start),
        (None, None) => item.span().map(|span| span.start),
    }
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = r#"builtin_tasks = false

[pricing]
baseline = "nowhere/model"

[[task]]
name = "greeting"
threshold = 1.5

[[workflow]]
name = "a"
max_prompt_tokens = 5

[[workflow]]
name = "b"
max_prompt_tokens = 0
"#;

    #[test]
    fn entry_and_field_form() {
        let message = "task `greeting`: `threshold` must be within 0..=1, got 1.5";
        assert_eq!(line_of(TEXT, message), Some(8));
    }

    #[test]
    fn indexed_path_form() {
        assert_eq!(line_of(TEXT, "`workflow[1].max_prompt_tokens` must be at least 1"), Some(16));
        assert_eq!(line_of(TEXT, "`pricing.baseline`: provider `nowhere` is not configured"), Some(4));
    }

    #[test]
    fn unnamed_field_has_no_line() {
        assert_eq!(line_of(TEXT, "no models to serve"), None);
        assert_eq!(line_of(TEXT, "`workflow[7].name` must not be empty"), None);
    }
}
