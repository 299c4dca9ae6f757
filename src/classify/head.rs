//! Linear softmax heads over sentence embeddings, stored as safetensors.
//!
//! A head file holds the tensors `weight` (F32, classes × dim) and `bias` (F32, classes), and
//! the safetensors metadata key `labels`: a JSON array of the label names in class order.
//! `encoder` names the encoder whose embeddings the head was trained on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::train::LinearModel;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("failed to read head file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write head file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid head file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A trained head: the linear model and the names of its classes.
#[derive(Debug, Clone)]
pub struct Head {
    pub labels: Vec<String>,
    pub model: LinearModel,
    /// Encoder whose embeddings the head expects, when the file names one.
    pub encoder: Option<String>,
}

impl Head {
    pub fn load(path: &Path) -> Result<Self, HeadError> {
        let bytes = std::fs::read(path).map_err(|source| HeadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| HeadError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
        let metadata = metadata.metadata().clone().unwrap_or_default();

        let weight = tensors.tensor("weight").map_err(|e| invalid(e.to_string()))?;
        let bias = tensors.tensor("bias").map_err(|e| invalid(e.to_string()))?;
        let (classes, dim) = match weight.shape() {
            [classes, dim] => (*classes, *dim),
            shape => return Err(invalid(format!("`weight` must be 2-D, got shape {shape:?}"))),
        };
        if bias.shape() != [classes] {
            return Err(invalid(format!(
                "`bias` has shape {:?}, expected [{classes}]",
                bias.shape()
            )));
        }
        let weight = f32_values(&weight).map_err(|m| invalid(format!("`weight`: {m}")))?;
        let bias = f32_values(&bias).map_err(|m| invalid(format!("`bias`: {m}")))?;

        let labels_json = metadata
            .get("labels")
            .ok_or_else(|| invalid("the metadata has no `labels` entry".into()))?;
        let labels: Vec<String> = serde_json::from_str(labels_json)
            .map_err(|e| invalid(format!("metadata `labels` is not a JSON array of strings: {e}")))?;
        if labels.len() != classes {
            return Err(invalid(format!(
                "{} labels for {classes} classes",
                labels.len()
            )));
        }
        Ok(Self {
            labels,
            model: LinearModel {
                weight,
                bias,
                classes,
                dim,
            },
            encoder: metadata.get("encoder").cloned(),
        })
    }

    /// Writes the head to `path` through a temporary file, so a reader never sees a partial
    /// file. `extra` adds metadata entries such as the training data and options.
    pub fn save(&self, path: &Path, extra: &[(&str, String)]) -> Result<(), HeadError> {
        let write_error = |source| HeadError::Write {
            path: path.to_path_buf(),
            source,
        };
        let weight_bytes = le_bytes(&self.model.weight);
        let bias_bytes = le_bytes(&self.model.bias);
        let invalid = |message: String| HeadError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut metadata = BTreeMap::new();
        let labels = serde_json::to_string(&self.labels).map_err(|e| invalid(e.to_string()))?;
        metadata.insert("labels".to_string(), labels);
        if let Some(encoder) = &self.encoder {
            metadata.insert("encoder".to_string(), encoder.clone());
        }
        for (key, value) in extra {
            metadata.insert(key.to_string(), value.clone());
        }
        let tensors = [
            ("bias", vec![self.model.classes], bias_bytes),
            ("weight", vec![self.model.classes, self.model.dim], weight_bytes),
        ];
        let bytes = serialize(&metadata, &tensors).map_err(|e| invalid(e.to_string()))?;

        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        let temporary = path.with_extension(format!("safetensors.{}.partial", std::process::id()));
        std::fs::write(&temporary, bytes).map_err(write_error)?;
        std::fs::rename(&temporary, path).map_err(write_error)
    }

    /// Returns the class probabilities for one embedding.
    pub fn probabilities(&self, embedding: &[f32]) -> Vec<f32> {
        self.model.probabilities(embedding)
    }
}

fn f32_values(view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!("dtype {:?}, expected F32", view.dtype()));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {index} is not finite"));
    }
    Ok(values)
}

/// Writes F32 tensors in the safetensors format with the header's keys in sorted order, so the
/// same head always gives the same bytes. `safetensors::serialize` takes its metadata as a
/// `HashMap`, whose order changes from one process to the next.
fn serialize(
    metadata: &BTreeMap<String, String>,
    tensors: &[(&str, Vec<usize>, Vec<u8>)],
) -> Result<Vec<u8>, serde_json::Error> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    let mut offset = 0;
    for (name, shape, data) in tensors {
        let entry = serde_json::json!({
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + data.len()],
        });
        header.insert(name.to_string(), entry);
        offset += data.len();
    }
    let mut header = serde_json::to_vec(&header)?;
    // The data must start at a multiple of 8 bytes; the format pads the header with spaces.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    for (_, _, data) in tensors {
        bytes.extend_from_slice(data);
    }
    Ok(bytes)
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_round_trips_through_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/head.safetensors");
        let head = Head {
            labels: vec!["negative".into(), "positive".into()],
            model: LinearModel {
                weight: vec![1.0, -2.0, 0.5, 3.0],
                bias: vec![0.25, -0.25],
                classes: 2,
                dim: 2,
            },
            encoder: Some("all-minilm-l6-v2".into()),
        };
        head.save(&path, &[("trained_on", "a.jsonl".into())]).unwrap();
        let loaded = Head::load(&path).unwrap();
        assert_eq!(loaded.labels, head.labels);
        assert_eq!(loaded.model.weight, head.model.weight);
        assert_eq!(loaded.model.bias, head.model.bias);
        assert_eq!(loaded.encoder.as_deref(), Some("all-minilm-l6-v2"));
    }

    #[test]
    fn head_without_labels_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.safetensors");
        let weight = le_bytes(&[1.0, 2.0]);
        let bias = le_bytes(&[0.0]);
        let tensors = [
            ("weight", TensorView::new(Dtype::F32, vec![1, 2], &weight).unwrap()),
            ("bias", TensorView::new(Dtype::F32, vec![1], &bias).unwrap()),
        ];
        std::fs::write(&path, safetensors::serialize(tensors, None).unwrap()).unwrap();
        let error = Head::load(&path).unwrap_err().to_string();
        assert!(error.contains("labels"), "{error}");
    }
}
