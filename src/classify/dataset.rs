//! Labelled data as JSONL: one `{"text": ..., "label": ...}` object per line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: String,
    /// `file:line` the example was read from, for error messages.
    #[serde(skip)]
    pub origin: Option<String>,
}

impl Example {
    /// Describes where the example came from: `file:line`, or its index when it was not read
    /// from a file.
    pub fn describe(&self, index: usize) -> String {
        match &self.origin {
            Some(origin) => origin.clone(),
            None => format!("example {index}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected a JSON object with string fields `text` and `label`: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path} contains no examples")]
    Empty { path: PathBuf },
}

/// Reads every example of `path`; blank lines are skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut example: Example = serde_json::from_str(line).map_err(|e| DatasetError::Line {
            path: path.to_path_buf(),
            line: index + 1,
            message: e.to_string(),
        })?;
        if example.text.trim().is_empty() {
            return Err(DatasetError::Line {
                path: path.to_path_buf(),
                line: index + 1,
                message: "`text` is empty".into(),
            });
        }
        example.origin = Some(format!("{}:{}", path.display(), index + 1));
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(examples)
}

/// Reads and concatenates several files, in order.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<Example>, DatasetError> {
    let mut examples = Vec::new();
    for path in paths {
        examples.extend(read_jsonl(path)?);
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_line_is_reported_with_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\":\"a\",\"label\":\"x\"}\n\n{\"text\":\"b\"}\n").unwrap();
        let error = read_jsonl(&path).unwrap_err().to_string();
        assert!(error.contains("d.jsonl:3"), "{error}");
    }

    #[test]
    fn blank_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\":\"a\",\"label\":\"x\"}\n\n{\"text\":\"b\",\"label\":\"y\"}\n").unwrap();
        let examples = read_jsonl(&path).unwrap();
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[1].label, "y");
    }

    #[test]
    fn empty_text_is_reported_with_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"  \",\"label\":\"y\"}\n").unwrap();
        let error = read_jsonl(&path).unwrap_err().to_string();
        assert!(error.contains("d.jsonl:2"), "{error}");
        assert!(error.contains("`text` is empty"), "{error}");
    }
}
