//! Routing requests between the local tier and remote providers.
//!
//! `config` contains the `[[route]]`, `[escalate]` and `[resilience]` tables, `criteria` the
//! per-request demands, `gate` the checks every escalation passes, `confidence` the score of a
//! generated answer, `upstreams` the provider clients, `resilience` retries, breakers and
//! fallback, and `pii` the personal-data detector. `label_prompt` and `label_escalation` ask
//! a remote model for the label of a classification input.

pub mod confidence;
pub mod config;
pub mod criteria;
pub mod gate;
pub mod label_escalation;
pub mod label_prompt;
pub mod pii;
pub mod resilience;
pub mod route;
pub mod upstreams;
