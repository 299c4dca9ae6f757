//! `AuditStore`: where audit records are written and read back, with SQLite as the default
//! implementation. `postgres` has the store that several replicas share.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::policy_change::PolicyChange;
use super::record::AuditRecord;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("audit database {target}: {message}")]
    Postgres {
        /// Host, port, user and database, without the password.
        target: String,
        /// The client's error with the server's message, which the client's own text leaves out.
        message: String,
    },
    #[error("{location} is not a tierd audit database: it has no table `{table}`")]
    NotAuditDatabase { location: String, table: &'static str },
    #[error("audit database {location} has schema version {found}, newer than this tierd ({supported})")]
    NewerSchema { location: String, found: i64, supported: i64 },
    #[error("invalid audit store setting: {0}")]
    Config(String),
    #[error("audit database {0} not found; pass --db with the file (see `[audit] path`) or a postgres:// URL")]
    NotFound(String),
}

/// Storage of audit records.
pub trait AuditStore: Send {
    /// Writes `records` in one transaction: all of them or none.
    fn write_batch(&mut self, records: &[AuditRecord]) -> Result<(), AuditError>;

    /// Returns the records with `time_ms` at or after `since_ms`, oldest first.
    fn records_since(&self, since_ms: i64) -> Result<Vec<AuditRecord>, AuditError>;

    /// Appends `changes` to the history of the live policy, all of them or none.
    fn write_policy_changes(&mut self, changes: &[PolicyChange]) -> Result<(), AuditError>;

    /// Returns the latest `limit` policy changes, newest first.
    fn policy_changes(&self, limit: usize) -> Result<Vec<PolicyChange>, AuditError>;
}

/// Schema version written to `PRAGMA user_version`. Version 2 added `over_budget`, version 3
/// the `policy_changes` table.
const SCHEMA_VERSION: i64 = 3;

const POLICY_CHANGES_TABLE: &str = "CREATE TABLE IF NOT EXISTS policy_changes (
    time_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    setting TEXT NOT NULL,
    old_value TEXT NOT NULL,
    new_value TEXT NOT NULL,
    generation INTEGER NOT NULL
)";

/// Statements that bring a database of version `index + 1` to the next version.
const MIGRATIONS: [&str; 2] = ["ALTER TABLE requests ADD COLUMN over_budget TEXT", POLICY_CHANGES_TABLE];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    client TEXT,
    workflow TEXT,
    endpoint TEXT NOT NULL,
    task TEXT,
    route TEXT,
    tier INTEGER NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    counterfactual_usd REAL NOT NULL,
    price_version TEXT NOT NULL,
    queue_ms REAL,
    prefill_ms REAL,
    decode_ms REAL,
    upstream_ms REAL,
    total_ms REAL NOT NULL,
    confidence REAL,
    escalation TEXT,
    kept_local TEXT,
    over_budget TEXT,
    status INTEGER NOT NULL,
    error TEXT,
    prompt TEXT,
    completion TEXT
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (time_ms);
CREATE INDEX IF NOT EXISTS requests_workflow_time ON requests (workflow, time_ms);
";

/// Audit records in one SQLite file, in WAL mode so that reports read while the server writes.
pub struct SqliteStore {
    path: PathBuf,
    connection: Connection,
    /// The select list of `COLUMNS`, with NULL for columns that an older file opened read-only
    /// lacks.
    select: String,
}

impl SqliteStore {
    /// Opens or creates the database at `path` and its schema.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let error = |source| AuditError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open(path).map_err(error)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(error)?;
        // With WAL, NORMAL loses no committed transaction on a process crash, only on power loss.
        connection.pragma_update(None, "synchronous", "NORMAL").map_err(error)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(error)?;

        let (found, existing) = inspect(&connection, path)?;
        // A new file gets the current schema, so only an older file needs migrating.
        if existing {
            for migration in MIGRATIONS.iter().skip(found.max(1) as usize - 1) {
                connection.execute_batch(migration).map_err(error)?;
            }
        }
        connection.execute_batch(SCHEMA).map_err(error)?;
        connection.execute_batch(POLICY_CHANGES_TABLE).map_err(error)?;
        connection
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(error)?;
        Ok(Self {
            path: path.to_path_buf(),
            connection,
            select: COLUMNS.to_string(),
        })
    }

    /// Opens an existing database to read records, without creating or migrating anything, for
    /// `tierd report`. A file without the `requests` table is an error.
    pub fn open_read_only(path: &Path) -> Result<Self, AuditError> {
        let error = |source| AuditError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(error)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(error)?;
        let (found, existing) = inspect(&connection, path)?;
        if !existing {
            return Err(AuditError::NotAuditDatabase {
                location: path.display().to_string(),
                table: "requests",
            });
        }
        // Version 1 has no `over_budget` column.
        let select = if found < 2 {
            COLUMNS.replace(" over_budget,", " NULL AS over_budget,")
        } else {
            COLUMNS.to_string()
        };
        Ok(Self {
            path: path.to_path_buf(),
            connection,
            select,
        })
    }

    fn error(&self, source: rusqlite::Error) -> AuditError {
        AuditError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Returns the record with request id `id`, if there is one.
    pub fn record(&self, id: &str) -> Result<Option<AuditRecord>, AuditError> {
        let sql = format!("SELECT {} FROM requests WHERE id = ?1", self.select);
        self.connection
            .query_row(&sql, [id], read_row)
            .optional()
            .map_err(|e| self.error(e))
    }
}

/// Returns the file's schema version and whether it has the `requests` table; a version newer
/// than this tierd's is an error.
fn inspect(connection: &Connection, path: &Path) -> Result<(i64, bool), AuditError> {
    let error = |source| AuditError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let found: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(error)?;
    if found > SCHEMA_VERSION {
        return Err(AuditError::NewerSchema {
            location: path.display().to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let tables: i64 = connection
        .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'requests'", [], |row| row.get(0))
        .map_err(error)?;
    Ok((found, tables > 0))
}

/// Columns of the requests table in both stores, in the order of `AuditRecord`'s fields.
pub(super) const COLUMNS: &str = "id, time_ms, client, workflow, endpoint, task, route, tier, provider, model, \
    input_tokens, output_tokens, cost_usd, counterfactual_usd, price_version, queue_ms, prefill_ms, \
    decode_ms, upstream_ms, total_ms, confidence, escalation, kept_local, over_budget, status, error, prompt, \
    completion";

/// Number of names in `COLUMNS`.
pub(super) const COLUMN_COUNT: usize = 28;

/// Converts a token count for SQL, whose integers are signed 64-bit.
pub(super) fn sql_count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Reads a token count back; a negative value, which tierd never writes, reads as 0.
pub(super) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        id: row.get(0)?,
        time_ms: row.get(1)?,
        client: row.get(2)?,
        workflow: row.get(3)?,
        endpoint: row.get(4)?,
        task: row.get(5)?,
        route: row.get(6)?,
        tier: row.get(7)?,
        provider: row.get(8)?,
        model: row.get(9)?,
        input_tokens: count(row.get(10)?),
        output_tokens: count(row.get(11)?),
        cost_usd: row.get(12)?,
        counterfactual_usd: row.get(13)?,
        price_version: row.get(14)?,
        queue_ms: row.get(15)?,
        prefill_ms: row.get(16)?,
        decode_ms: row.get(17)?,
        upstream_ms: row.get(18)?,
        total_ms: row.get(19)?,
        confidence: row.get(20)?,
        escalation: row.get(21)?,
        kept_local: row.get(22)?,
        over_budget: row.get(23)?,
        status: row.get(24)?,
        error: row.get(25)?,
        prompt: row.get(26)?,
        completion: row.get(27)?,
    })
}

impl AuditStore for SqliteStore {
    fn write_batch(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
        let path = self.path.clone();
        let error = |source| AuditError::Sqlite {
            path: path.clone(),
            source,
        };
        let transaction = self.connection.transaction().map_err(error)?;
        {
            let sql = format!(
                "INSERT INTO requests ({COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, \
                  ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)"
            );
            let mut insert = transaction.prepare_cached(&sql).map_err(error)?;
            for r in records {
                insert
                    .execute(params![
                        r.id,
                        r.time_ms,
                        r.client,
                        r.workflow,
                        r.endpoint,
                        r.task,
                        r.route,
                        r.tier,
                        r.provider,
                        r.model,
                        sql_count(r.input_tokens),
                        sql_count(r.output_tokens),
                        r.cost_usd,
                        r.counterfactual_usd,
                        r.price_version,
                        r.queue_ms,
                        r.prefill_ms,
                        r.decode_ms,
                        r.upstream_ms,
                        r.total_ms,
                        r.confidence,
                        r.escalation,
                        r.kept_local,
                        r.over_budget,
                        r.status,
                        r.error,
                        r.prompt,
                        r.completion,
                    ])
                    .map_err(error)?;
            }
        }
        transaction.commit().map_err(error)
    }

    fn records_since(&self, since_ms: i64) -> Result<Vec<AuditRecord>, AuditError> {
        let sql = format!("SELECT {} FROM requests WHERE time_ms >= ?1 ORDER BY time_ms, rowid", self.select);
        let mut query = self.connection.prepare(&sql).map_err(|e| self.error(e))?;
        let rows = query.query_map([since_ms], read_row).map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.error(e))
    }

    fn write_policy_changes(&mut self, changes: &[PolicyChange]) -> Result<(), AuditError> {
        let path = self.path.clone();
        let error = |source| AuditError::Sqlite {
            path: path.clone(),
            source,
        };
        let transaction = self.connection.transaction().map_err(error)?;
        for change in changes {
            transaction
                .execute(
                    "INSERT INTO policy_changes (time_ms, actor, setting, old_value, new_value, generation) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        change.time_ms,
                        change.actor,
                        change.setting,
                        change.old_value,
                        change.new_value,
                        sql_count(change.generation)
                    ],
                )
                .map_err(error)?;
        }
        transaction.commit().map_err(error)
    }

    fn policy_changes(&self, limit: usize) -> Result<Vec<PolicyChange>, AuditError> {
        let exists: i64 = self
            .connection
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'policy_changes'", [], |row| row.get(0))
            .map_err(|e| self.error(e))?;
        if exists == 0 {
            // A file older than version 3, opened read-only, has no history.
            return Ok(Vec::new());
        }
        let mut query = self
            .connection
            .prepare(
                "SELECT time_ms, actor, setting, old_value, new_value, generation FROM policy_changes \
                 ORDER BY time_ms DESC, rowid DESC LIMIT ?1",
            )
            .map_err(|e| self.error(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = query
            .query_map([limit], |row| {
                Ok(PolicyChange {
                    time_ms: row.get(0)?,
                    actor: row.get(1)?,
                    setting: row.get(2)?,
                    old_value: row.get(3)?,
                    new_value: row.get(4)?,
                    generation: count(row.get(5)?),
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, time_ms: i64) -> AuditRecord {
        AuditRecord {
            id: id.into(),
            time_ms,
            workflow: Some("support".into()),
            endpoint: "/v1/chat/completions".into(),
            tier: 3,
            provider: "local".into(),
            model: "qwen".into(),
            input_tokens: 12,
            output_tokens: 5,
            price_version: "v1".into(),
            total_ms: 81.5,
            confidence: Some(0.91),
            status: 200,
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip_through_the_file() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("audit.db");
        let mut store = SqliteStore::open(&path).expect("open");
        let records = vec![record("a", 1_000), record("b", 2_000)];
        store.write_batch(&records).expect("write");
        drop(store);

        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.records_since(0).expect("read"), records);
        assert_eq!(store.records_since(1_500).expect("read").len(), 1);
        assert_eq!(store.record("b").expect("read"), Some(records[1].clone()));
        assert_eq!(store.record("c").expect("read"), None);
    }

    #[test]
    fn version_1_file_is_migrated() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("audit.db");
        let connection = Connection::open(&path).expect("open");
        let version_1 = SCHEMA.replace("    over_budget TEXT,\n", "");
        connection.execute_batch(&version_1).expect("version 1 schema");
        connection.pragma_update(None, "user_version", 1).expect("set version");
        let old_columns = COLUMNS.replace(" over_budget,", "");
        connection
            .execute(
                &format!(
                    "INSERT INTO requests ({old_columns}) VALUES ('old', 5, NULL, NULL, '/v1/classify', NULL, NULL, 3, \
                     'local', 'm', 1, 0, 0, 0, '1', NULL, NULL, NULL, NULL, 2.0, NULL, NULL, NULL, 200, NULL, NULL, NULL)"
                ),
                [],
            )
            .expect("version 1 row");
        drop(connection);

        let mut store = SqliteStore::open(&path).expect("migrate");
        let mut new = record("new", 10);
        new.over_budget = Some("warn".into());
        store.write_batch(&[new.clone()]).expect("write");
        let records = store.records_since(0).expect("read");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].id, "old");
        assert_eq!(records[0].over_budget, None);
        assert_eq!(records[1], new);
        let version: i64 = store
            .connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn read_only_open_changes_nothing() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .and_then(|c| c.execute_batch("CREATE TABLE notes (text TEXT)"))
            .expect("another database");
        let error = SqliteStore::open_read_only(&other).err().expect("not an audit file");
        assert!(matches!(error, AuditError::NotAuditDatabase { .. }), "{error}");
        let tables: i64 = Connection::open(&other)
            .and_then(|c| c.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'requests'", [], |r| r.get(0)))
            .expect("count tables");
        assert_eq!(tables, 0, "the read-only open created the table");

        // A version 1 file is read as it is, without migrating it.
        let old = dir.path().join("old.db");
        let connection = Connection::open(&old).expect("open");
        connection
            .execute_batch(&SCHEMA.replace("    over_budget TEXT,\n", ""))
            .expect("version 1 schema");
        connection.pragma_update(None, "user_version", 1).expect("set version");
        drop(connection);
        let store = SqliteStore::open_read_only(&old).expect("open version 1");
        assert!(store.records_since(0).expect("read").is_empty());
        let version: i64 = store
            .connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version, 1);
    }

    #[test]
    fn column_count_matches_the_list() {
        assert_eq!(COLUMNS.split(',').count(), COLUMN_COUNT);
    }

    #[test]
    fn newer_schema_is_rejected() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("audit.db");
        let connection = Connection::open(&path).expect("open");
        connection.pragma_update(None, "user_version", 99).expect("set version");
        drop(connection);
        let error = SqliteStore::open(&path).err().expect("newer schema");
        assert!(matches!(error, AuditError::NewerSchema { found: 99, .. }), "{error}");
    }
}
