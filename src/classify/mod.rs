//! Classification tasks: labels defined in configuration, answered by a sentence encoder with
//! a linear head or by scoring the labels with a GGUF language model, each with a confidence.
//!
//! `task_config` holds the configuration and the built-in tasks, `task` the loaded task and
//! its backend chain, and `backend` the two backends. `encoder`, `encoder_worker` (the
//! encoder's thread and dynamic batching), `head`, `label_scoring` and `prompt` are their
//! parts. `train`, `fit` and `dataset` fit heads, `metrics` evaluates and `calibration` picks
//! thresholds.

pub mod backend;
pub mod calibration;
pub mod dataset;
pub mod encoder;
pub mod encoder_worker;
pub mod fit;
pub mod head;
pub mod label_scoring;
pub mod metrics;
pub mod prompt;
pub mod setup;
pub mod task;
pub mod task_config;
pub mod train;

pub use task::{Classification, ClassifyError, Task, TaskSet};
pub use task_config::TaskConfig;
