//! `PostgresStore`: audit records in a PostgreSQL table, so that several tierd replicas write one
//! audit trail and `tierd report` reads all of it.
//!
//! The table `tierd_requests` has the columns of the SQLite store. `tierd_audit_schema` holds its
//! version, and a transaction-level advisory lock serialises schema changes between replicas that
//! start together. A closed connection is opened again before the next write.

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Config, NoTls};

use super::policy_change::PolicyChange;
use super::record::AuditRecord;
use super::store::{count, sql_count, AuditError, AuditStore, COLUMNS, COLUMN_COUNT};

/// Version of the PostgreSQL schema, stored in `tierd_audit_schema`.
const SCHEMA_VERSION: i64 = 1;

/// Key of the advisory lock held while the schema is created; any constant that other
/// applications of the database are unlikely to use.
const SCHEMA_LOCK: i64 = 0x7469_6572_6461_7564;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tierd_audit_schema (version BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS tierd_requests (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    client TEXT,
    workflow TEXT,
    endpoint TEXT NOT NULL,
    task TEXT,
    route TEXT,
    tier SMALLINT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    counterfactual_usd DOUBLE PRECISION NOT NULL,
    price_version TEXT NOT NULL,
    queue_ms DOUBLE PRECISION,
    prefill_ms DOUBLE PRECISION,
    decode_ms DOUBLE PRECISION,
    upstream_ms DOUBLE PRECISION,
    total_ms DOUBLE PRECISION NOT NULL,
    confidence DOUBLE PRECISION,
    escalation TEXT,
    kept_local TEXT,
    over_budget TEXT,
    status INTEGER NOT NULL,
    error TEXT,
    prompt TEXT,
    completion TEXT
);
CREATE INDEX IF NOT EXISTS tierd_requests_time ON tierd_requests (time_ms);
CREATE INDEX IF NOT EXISTS tierd_requests_id ON tierd_requests (id);
CREATE INDEX IF NOT EXISTS tierd_requests_workflow_time ON tierd_requests (workflow, time_ms);
CREATE TABLE IF NOT EXISTS tierd_policy_changes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    setting TEXT NOT NULL,
    old_value TEXT NOT NULL,
    new_value TEXT NOT NULL,
    generation BIGINT NOT NULL
);
";

/// Time allowed for opening a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Audit records in a PostgreSQL database.
pub struct PostgresStore {
    config: Config,
    /// Host, port, user and database, for messages; never the password.
    target: String,
    /// `None` after the connection was found closed, until the next operation reopens it.
    client: Mutex<Option<Client>>,
}

impl PostgresStore {
    /// Connects to the database of `url` (`postgres://user:password@host:port/database`) and
    /// creates the schema. Without a password in the URL, `PGPASSWORD` is used when set.
    pub fn connect(url: &str) -> Result<Self, AuditError> {
        let (config, target) = parse_url(url)?;
        let client = open(&config, &target)?;
        Ok(Self {
            config,
            target,
            client: Mutex::new(Some(client)),
        })
    }

    /// Connects to read records only: the schema is neither created nor changed, and a
    /// database without the audit table is an error.
    pub fn connect_for_reading(url: &str) -> Result<Self, AuditError> {
        let (config, target) = parse_url(url)?;
        let client = open_read_only(&config, &target)?;
        Ok(Self {
            config,
            target,
            client: Mutex::new(Some(client)),
        })
    }

    fn error(&self, source: postgres::Error) -> AuditError {
        postgres_error(&self.target, &source)
    }

    /// Runs `work` on the connection, opening it first when it was closed. A failure that
    /// closed the connection drops it, so the next call reconnects.
    fn with_client<T>(&self, work: impl FnOnce(&mut Client) -> Result<T, postgres::Error>) -> Result<T, AuditError> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(open(&self.config, &self.target)?);
        }
        let Some(client) = slot.as_mut() else {
            return Err(AuditError::Config("the PostgreSQL connection is missing".into()));
        };
        let result = work(client);
        if client.is_closed() {
            tracing::warn!(target = %self.target, "the audit database connection closed; it reopens on the next write");
            *slot = None;
        }
        result.map_err(|e| self.error(e))
    }

    /// Returns the records with request id `id`, oldest first; several replicas may each
    /// store a request of a reused client id.
    pub fn records_with_id(&self, id: &str) -> Result<Vec<AuditRecord>, AuditError> {
        let sql = format!("SELECT {COLUMNS} FROM tierd_requests WHERE id = $1 ORDER BY seq");
        let rows = self.with_client(|client| client.query(&sql, &[&id]))?;
        rows.iter().map(|row| read_row(row).map_err(|e| self.error(e))).collect()
    }
}

/// Parses `url`, takes the password from `PGPASSWORD` when the URL has none, and returns the
/// settings with the description that messages use.
fn parse_url(url: &str) -> Result<(Config, String), AuditError> {
    if url.trim().is_empty() {
        return Err(AuditError::Config("the PostgreSQL URL is empty".into()));
    }
    let mut config: Config = url
        .parse()
        .map_err(|e| AuditError::Config(format!("invalid PostgreSQL URL: {e}")))?;
    if config.get_password().is_none() {
        if let Ok(password) = std::env::var("PGPASSWORD") {
            config.password(password);
        }
    }
    config.connect_timeout(CONNECT_TIMEOUT);
    // NOTE: connections are not encrypted; reach a remote database through a TLS tunnel or a
    // private network.
    let target = describe(&config);
    Ok((config, target))
}

/// Opens a connection and brings the schema to the current version.
fn open(config: &Config, target: &str) -> Result<Client, AuditError> {
    let error = |source: postgres::Error| postgres_error(target, &source);
    let mut client = config.connect(NoTls).map_err(error)?;
    // CREATE ... IF NOT EXISTS reports existing objects as notices, which would reach the log.
    client.batch_execute("SET client_min_messages = warning").map_err(error)?;
    let mut transaction = client.transaction().map_err(error)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .map_err(error)?;
    transaction.batch_execute(SCHEMA).map_err(error)?;
    let found: Option<i64> = transaction
        .query_opt("SELECT max(version) FROM tierd_audit_schema", &[])
        .map_err(error)?
        .and_then(|row| row.get(0));
    match found {
        Some(found) if found > SCHEMA_VERSION => {
            return Err(AuditError::NewerSchema {
                location: target.to_string(),
                found,
                supported: SCHEMA_VERSION,
            })
        }
        Some(_) => {}
        None => {
            transaction
                .execute("INSERT INTO tierd_audit_schema (version) VALUES ($1)", &[&SCHEMA_VERSION])
                .map_err(error)?;
        }
    }
    transaction.commit().map_err(error)?;
    Ok(client)
}

/// Builds the error of a failed call, with the server's message and detail when it sent them.
fn postgres_error(target: &str, source: &postgres::Error) -> AuditError {
    let message = match source.as_db_error() {
        Some(db) => {
            let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            format!("{} {}: {}{detail}", db.severity(), db.code().code(), db.message())
        }
        None => {
            let cause = std::error::Error::source(source).map(|c| format!(": {c}")).unwrap_or_default();
            format!("{source}{cause}")
        }
    };
    AuditError::Postgres {
        target: target.to_string(),
        message,
    }
}

/// Connects without creating or changing the schema, for `tierd report`; fails when the
/// database has no audit table.
fn open_read_only(config: &Config, target: &str) -> Result<Client, AuditError> {
    let error = |source: postgres::Error| postgres_error(target, &source);
    let mut client = config.connect(NoTls).map_err(error)?;
    let exists: bool = client
        .query_one("SELECT to_regclass('tierd_requests') IS NOT NULL", &[])
        .map_err(error)?
        .get(0);
    if !exists {
        return Err(AuditError::NotAuditDatabase {
            location: target.to_string(),
            table: "tierd_requests",
        });
    }
    Ok(client)
}

/// Describes the database of `config` for messages, without the password.
fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// A record's values in the types of the table's columns.
struct SqlValues<'a> {
    record: &'a AuditRecord,
    tier: i16,
    input_tokens: i64,
    output_tokens: i64,
    status: i32,
}

impl<'a> SqlValues<'a> {
    fn new(record: &'a AuditRecord) -> Self {
        Self {
            record,
            tier: i16::from(record.tier),
            input_tokens: sql_count(record.input_tokens),
            output_tokens: sql_count(record.output_tokens),
            status: i32::from(record.status),
        }
    }

    /// Returns the parameters in the order of `COLUMNS`.
    fn params(&self) -> [&(dyn ToSql + Sync); COLUMN_COUNT] {
        let r = self.record;
        [
            &r.id,
            &r.time_ms,
            &r.client,
            &r.workflow,
            &r.endpoint,
            &r.task,
            &r.route,
            &self.tier,
            &r.provider,
            &r.model,
            &self.input_tokens,
            &self.output_tokens,
            &r.cost_usd,
            &r.counterfactual_usd,
            &r.price_version,
            &r.queue_ms,
            &r.prefill_ms,
            &r.decode_ms,
            &r.upstream_ms,
            &r.total_ms,
            &r.confidence,
            &r.escalation,
            &r.kept_local,
            &r.over_budget,
            &self.status,
            &r.error,
            &r.prompt,
            &r.completion,
        ]
    }
}

/// Returns `record` with every NUL character replaced by U+FFFD, because PostgreSQL text cannot
/// hold NUL and a client could otherwise make its own record fail to insert.
fn without_nul(record: &AuditRecord) -> Cow<'_, AuditRecord> {
    let texts = [
        Some(&record.id),
        record.client.as_ref(),
        record.workflow.as_ref(),
        Some(&record.endpoint),
        record.task.as_ref(),
        record.route.as_ref(),
        Some(&record.provider),
        Some(&record.model),
        Some(&record.price_version),
        record.escalation.as_ref(),
        record.kept_local.as_ref(),
        record.over_budget.as_ref(),
        record.error.as_ref(),
        record.prompt.as_ref(),
        record.completion.as_ref(),
    ];
    if !texts.into_iter().flatten().any(|text| text.contains('\0')) {
        return Cow::Borrowed(record);
    }
    let clean = |text: &str| text.replace('\0', "\u{FFFD}");
    let clean_option = |text: &Option<String>| text.as_deref().map(clean);
    Cow::Owned(AuditRecord {
        id: clean(&record.id),
        client: clean_option(&record.client),
        workflow: clean_option(&record.workflow),
        endpoint: clean(&record.endpoint),
        task: clean_option(&record.task),
        route: clean_option(&record.route),
        provider: clean(&record.provider),
        model: clean(&record.model),
        price_version: clean(&record.price_version),
        escalation: clean_option(&record.escalation),
        kept_local: clean_option(&record.kept_local),
        over_budget: clean_option(&record.over_budget),
        error: clean_option(&record.error),
        prompt: clean_option(&record.prompt),
        completion: clean_option(&record.completion),
        ..record.clone()
    })
}

/// Builds one `INSERT` of `rows` records: a single round trip per batch.
fn insert_sql(rows: usize) -> String {
    let mut sql = format!("INSERT INTO tierd_requests ({COLUMNS}) VALUES ");
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        let placeholders: Vec<String> = (1..=COLUMN_COUNT).map(|column| format!("${}", row * COLUMN_COUNT + column)).collect();
        sql.push('(');
        sql.push_str(&placeholders.join(", "));
        sql.push(')');
    }
    sql
}

fn read_row(row: &postgres::Row) -> Result<AuditRecord, postgres::Error> {
    let tier: i16 = row.try_get(7)?;
    let status: i32 = row.try_get(24)?;
    Ok(AuditRecord {
        id: row.try_get(0)?,
        time_ms: row.try_get(1)?,
        client: row.try_get(2)?,
        workflow: row.try_get(3)?,
        endpoint: row.try_get(4)?,
        task: row.try_get(5)?,
        route: row.try_get(6)?,
        // Values outside the Rust types were never written by tierd; they read as 0.
        tier: u8::try_from(tier).unwrap_or(0),
        provider: row.try_get(8)?,
        model: row.try_get(9)?,
        input_tokens: count(row.try_get(10)?),
        output_tokens: count(row.try_get(11)?),
        cost_usd: row.try_get(12)?,
        counterfactual_usd: row.try_get(13)?,
        price_version: row.try_get(14)?,
        queue_ms: row.try_get(15)?,
        prefill_ms: row.try_get(16)?,
        decode_ms: row.try_get(17)?,
        upstream_ms: row.try_get(18)?,
        total_ms: row.try_get(19)?,
        confidence: row.try_get(20)?,
        escalation: row.try_get(21)?,
        kept_local: row.try_get(22)?,
        over_budget: row.try_get(23)?,
        status: u16::try_from(status).unwrap_or(0),
        error: row.try_get(25)?,
        prompt: row.try_get(26)?,
        completion: row.try_get(27)?,
    })
}

impl AuditStore for PostgresStore {
    fn write_batch(&mut self, records: &[AuditRecord]) -> Result<(), AuditError> {
        if records.is_empty() {
            return Ok(());
        }
        let cleaned: Vec<Cow<'_, AuditRecord>> = records.iter().map(without_nul).collect();
        let values: Vec<SqlValues<'_>> = cleaned.iter().map(|record| SqlValues::new(record)).collect();
        let params: Vec<&(dyn ToSql + Sync)> = values.iter().flat_map(|v| v.params()).collect();
        let sql = insert_sql(records.len());
        // One statement inserts every row or none, as the trait requires.
        self.with_client(|client| client.execute(&sql, &params).map(|_| ()))
    }

    fn records_since(&self, since_ms: i64) -> Result<Vec<AuditRecord>, AuditError> {
        let sql = format!("SELECT {COLUMNS} FROM tierd_requests WHERE time_ms >= $1 ORDER BY time_ms, seq");
        let rows = self.with_client(|client| client.query(&sql, &[&since_ms]))?;
        rows.iter().map(|row| read_row(row).map_err(|e| self.error(e))).collect()
    }

    fn write_policy_changes(&mut self, changes: &[PolicyChange]) -> Result<(), AuditError> {
        self.with_client(|client| {
            let mut transaction = client.transaction()?;
            for change in changes {
                let generation = sql_count(change.generation);
                transaction.execute(
                    "INSERT INTO tierd_policy_changes (time_ms, actor, setting, old_value, new_value, generation) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &change.time_ms,
                        &change.actor.replace('\0', "\u{FFFD}"),
                        &change.setting.replace('\0', "\u{FFFD}"),
                        &change.old_value.replace('\0', "\u{FFFD}"),
                        &change.new_value.replace('\0', "\u{FFFD}"),
                        &generation,
                    ],
                )?;
            }
            transaction.commit()
        })
    }

    fn policy_changes(&self, limit: usize) -> Result<Vec<PolicyChange>, AuditError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.with_client(|client| {
            client.query(
                "SELECT time_ms, actor, setting, old_value, new_value, generation FROM tierd_policy_changes \
                 ORDER BY time_ms DESC, seq DESC LIMIT $1",
                &[&limit],
            )
        })?;
        rows.iter()
            .map(|row| {
                Ok(PolicyChange {
                    time_ms: row.try_get(0)?,
                    actor: row.try_get(1)?,
                    setting: row.try_get(2)?,
                    old_value: row.try_get(3)?,
                    new_value: row.try_get(4)?,
                    generation: count(row.try_get(5)?),
                })
            })
            .collect::<Result<Vec<_>, postgres::Error>>()
            .map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_numbers_every_placeholder() {
        let sql = insert_sql(2);
        assert!(sql.contains("($1, $2,"), "{sql}");
        assert!(sql.ends_with(&format!("${})", 2 * COLUMN_COUNT)), "{sql}");
        assert_eq!(sql.matches('$').count(), 2 * COLUMN_COUNT);
    }

    #[test]
    fn target_omits_the_password() {
        let config: Config = "postgres://audit:secret@127.0.0.1:6543/tierd".parse().expect("url");
        let target = describe(&config);
        assert_eq!(target, "postgres://audit@127.0.0.1:6543/tierd");
    }

    #[test]
    fn nul_characters_are_replaced() {
        let record = AuditRecord {
            workflow: Some("nul\0byte".into()),
            model: "m".into(),
            ..Default::default()
        };
        let cleaned = without_nul(&record);
        assert_eq!(cleaned.workflow.as_deref(), Some("nul\u{FFFD}byte"));
        assert_eq!(cleaned.model, "m");
        let plain = AuditRecord::default();
        assert!(matches!(without_nul(&plain), Cow::Borrowed(_)));
    }

    #[test]
    fn empty_url_is_a_config_error() {
        let error = PostgresStore::connect("").err().expect("empty URL");
        assert!(error.to_string().contains("empty"), "{error}");
    }

    #[test]
    fn malformed_url_is_a_config_error() {
        let error = PostgresStore::connect("postgres://host:notaport/db").err().expect("invalid URL");
        assert!(matches!(error, AuditError::Config(_)), "{error}");
    }
}
