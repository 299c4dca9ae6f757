//! tierd: a local tier-3 inference server for small quantized models.

pub mod model;
pub mod tokenizer;
pub mod engine;
pub mod config;
pub mod manifest;
pub mod hub;
pub mod registry;
pub mod server;
pub mod kernels;
pub mod classify;
pub mod commands;
pub mod routing;
pub mod providers;
pub mod audit;
pub mod budget;
pub mod client_keys;
pub mod metrics;
pub mod policy;
pub mod chart;
