//! Routing requests between the local tier and remote providers.
//!
//! `config` holds the `[[route]]`, `[escalate]` and `[resilience]` tables, `criteria` the
//! per-request demands, `gate` the checks every escalation passes, `confidence` the score of a
//! generated answer, `upstreams` the provider clients, `resilience` retries, breakers and
//! fallback, and `pii` the personal-data detector.

pub mod confidence;
pub mod config;
pub mod criteria;
pub mod gate;
pub mod pii;
pub mod resilience;
pub mod route;
pub mod upstreams;
