//! The audit trail: one record per request, written in batches by a background thread to a
//! store (SQLite by default, or PostgreSQL for several replicas), and the prices its costs are
//! computed with.

pub mod config;
pub mod handle;
pub mod policy_change;
pub mod postgres;
pub mod pricing;
pub mod record;
pub mod report;
pub mod store;
pub mod writer;

pub use pricing::{Costs, Price, PriceTable};
pub use record::AuditRecord;
pub use policy_change::PolicyChange;
pub use postgres::PostgresStore;
pub use store::{AuditError, AuditStore, SqliteStore};
pub use writer::{AuditWriter, WriterStats};
