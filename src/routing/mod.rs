//! Routing requests between the local tier and remote providers.

pub mod pii;
pub mod resilience;
