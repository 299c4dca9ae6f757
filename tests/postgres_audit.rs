//! The PostgreSQL audit store against a real PostgreSQL server that the test starts on
//! 127.0.0.1: records round-trip, a restarted server is reconnected to, a newer schema is
//! rejected, and two `tierd serve` replicas write one trail that `tierd report` reads.
//!
//! Run with `cargo test --release --test postgres_audit`. It needs PostgreSQL's `initdb` and
//! `postgres` (Debian's postgresql package), which `scripts/test.sh` installs when missing.

mod common;
mod mock_provider;

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::postgres::{TempPostgres, PASSWORD};
use common::*;
use reqwest::StatusCode;
use serde_json::Value;
use tierd::audit::{AuditError, AuditRecord, AuditStore, PolicyChange, PostgresStore};

static SHARED: OnceLock<TempPostgres> = OnceLock::new();

extern "C" fn stop_shared_postgres() {
    if let Some(server) = SHARED.get() {
        server.shut_down();
    }
}

/// Returns the PostgreSQL server that every test of this binary shares, each in its own
/// database, starting it on the first call. An `atexit` hook stops it when the binary exits.
fn shared_postgres() -> &'static TempPostgres {
    SHARED.get_or_init(|| {
        let server = TempPostgres::start().unwrap_or_else(|message| panic!("{message}"));
        // SAFETY: registers a plain function with no captured state.
        if unsafe { libc::atexit(stop_shared_postgres) } != 0 {
            panic!("atexit failed, so PostgreSQL would outlive the tests");
        }
        server
    })
}

fn record(id: &str, time_ms: i64) -> AuditRecord {
    AuditRecord {
        id: id.into(),
        time_ms,
        client: Some("billing".into()),
        workflow: Some("support".into()),
        endpoint: "/v1/chat/completions".into(),
        route: Some("auto".into()),
        tier: 1,
        provider: "frontier".into(),
        model: "big".into(),
        input_tokens: 12,
        output_tokens: 5,
        cost_usd: 0.000_111,
        counterfactual_usd: 0.000_222,
        price_version: "v1".into(),
        upstream_ms: Some(40.25),
        total_ms: 81.5,
        confidence: Some(0.91),
        escalation: Some("low_confidence".into()),
        over_budget: Some("warn".into()),
        status: 200,
        prompt: Some("user: hi".into()),
        ..Default::default()
    }
}

#[test]
fn records_round_trip() {
    let url = shared_postgres().create_database("round_trip");
    let mut store = PostgresStore::connect(&url).expect("connect");
    let records = vec![record("a", 1_000), record("b", 2_000), record("a", 3_000)];
    store.write_batch(&records).expect("write");
    drop(store);

    // A second connection finds the schema in place and reads the same rows.
    let store = PostgresStore::connect(&url).expect("reconnect");
    assert_eq!(store.records_since(0).expect("read"), records);
    assert_eq!(store.records_since(1_500).expect("read").len(), 2);
    let with_a = store.records_with_id("a").expect("read");
    assert_eq!(with_a.iter().map(|r| r.time_ms).collect::<Vec<_>>(), [1_000, 3_000]);
}

#[test]
fn policy_changes_round_trip_newest_first() {
    let url = shared_postgres().create_database("policy_changes");
    let mut store = PostgresStore::connect(&url).expect("connect");
    let change = |time_ms: i64, actor: &str, new_value: &str, generation: u64| PolicyChange {
        time_ms,
        actor: actor.into(),
        setting: "task.sentiment.threshold".into(),
        old_value: "0.9".into(),
        new_value: new_value.into(),
        generation,
    };
    store
        .write_policy_changes(&[change(1_000, "config file", "0.85", 2), change(2_000, "budget-owner", "0.8", 3)])
        .expect("write");
    drop(store);

    let store = PostgresStore::connect(&url).expect("reconnect");
    let latest = store.policy_changes(10).expect("read");
    assert_eq!(latest.len(), 2);
    assert_eq!((latest[0].actor.as_str(), latest[0].new_value.as_str(), latest[0].generation), ("budget-owner", "0.8", 3));
    assert_eq!((latest[1].actor.as_str(), latest[1].time_ms), ("config file", 1_000));
    assert_eq!(store.policy_changes(1).expect("read").len(), 1);
}

#[test]
fn nul_characters_do_not_lose_the_record() {
    let url = shared_postgres().create_database("nul_characters");
    let mut store = PostgresStore::connect(&url).expect("connect");
    let mut with_nul = record("nul", 1);
    with_nul.workflow = Some("nul\0byte".into());
    store.write_batch(&[with_nul]).expect("a NUL must not fail the insert");
    let rows = store.records_since(0).expect("read");
    assert_eq!(rows[0].workflow.as_deref(), Some("nul\u{FFFD}byte"));
}

#[test]
fn report_leaves_a_foreign_database_alone() {
    let url = shared_postgres().create_database("foreign");
    let error = PostgresStore::connect_for_reading(&url).err().expect("no audit table");
    assert!(matches!(error, AuditError::NotAuditDatabase { .. }), "{error}");
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
    let tables: i64 = client
        .query_one("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'tierd%'", &[])
        .expect("count tables")
        .get(0);
    assert_eq!(tables, 0, "reading created tables");
}

#[test]
fn full_batch_is_one_statement() {
    let url = shared_postgres().create_database("full_batch");
    let mut store = PostgresStore::connect(&url).expect("connect");
    // The audit writer's largest batch: 256 records of 28 columns each.
    let records: Vec<AuditRecord> = (0..256).map(|i| record(&format!("r{i}"), i)).collect();
    store.write_batch(&records).expect("write");
    assert_eq!(store.records_since(0).expect("read").len(), 256);
}

#[test]
fn restarted_server_is_reconnected() {
    let server = TempPostgres::start().expect("a second PostgreSQL server");
    let url = server.create_database("restart");
    let mut store = PostgresStore::connect(&url).expect("connect");
    store.write_batch(&[record("before", 1)]).expect("write");

    server.restart().expect("restart PostgreSQL");
    // The first write after the restart may find the old connection closed; the writer
    // retries, and the retry reconnects.
    let first = store.write_batch(&[record("after", 2)]);
    if first.is_err() {
        store.write_batch(&[record("after", 2)]).expect("write after reconnecting");
    }
    let ids: Vec<String> = store.records_since(0).expect("read").into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["before", "after"]);
}

#[test]
fn newer_schema_is_rejected() {
    let url = shared_postgres().create_database("newer_schema");
    drop(PostgresStore::connect(&url).expect("create the schema"));
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
    client
        .batch_execute("INSERT INTO tierd_audit_schema (version) VALUES (99)")
        .expect("set a newer version");
    let error = PostgresStore::connect(&url).err().expect("newer schema");
    assert!(matches!(error, AuditError::NewerSchema { found: 99, .. }), "{error}");
    assert!(!error.to_string().contains(PASSWORD), "the message shows the password: {error}");
}

#[test]
fn wrong_password_names_the_database_not_the_password() {
    let url = shared_postgres().url("postgres", false).replace("tierd@", "tierd:not-the-password@");
    let error = PostgresStore::connect(&url).err().expect("authentication fails");
    let message = error.to_string();
    assert!(message.contains(&format!("127.0.0.1:{}", shared_postgres().port)), "{message}");
    assert!(!message.contains("not-the-password"), "the message shows the password: {message}");
}

fn replica_config() -> String {
    format!(
        "builtin_tasks = false\n[server]\ndefault_max_tokens = 4\n[audit]\nstore = \"postgres\"\n\
         postgres_url_env = \"TIERD_TEST_AUDIT_URL\"\n{}",
        model_table(QWEN, None)
    )
}

#[test]
fn replicas_share_one_trail() {
    let url = shared_postgres().create_database("replicas");
    let env = [("TIERD_TEST_AUDIT_URL", url.as_str())];
    // Both replicas start together, so they create the schema at the same time.
    let (first, second) = std::thread::scope(|scope| {
        let first = scope.spawn(|| Server::try_start_with_env("postgres-replica-1", &replica_config(), &env));
        let second = scope.spawn(|| Server::try_start_with_env("postgres-replica-2", &replica_config(), &env));
        (first.join(), second.join())
    });
    let first = first.expect("replica 1 thread").unwrap_or_else(|message| panic!("{message}"));
    let second = second.expect("replica 2 thread").unwrap_or_else(|message| panic!("{message}"));

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        for (index, server) in [&first, &first, &second].into_iter().enumerate() {
            let reply = client()
                .post(server.url("/v1/chat/completions"))
                .header("x-request-id", format!("replica-{index}"))
                .header("x-tierd-workflow", "shared")
                .json(&chat_request(QWEN, "Say yes.", 2))
                .send()
                .await
                .expect("POST /v1/chat/completions");
            assert_eq!(reply.status(), StatusCode::OK);
        }
    });
    // SIGTERM flushes each replica's queue before it exits.
    for server in [&first, &second] {
        let status = server.terminate(Duration::from_secs(60));
        assert!(status.is_some_and(|s| s.success()), "a replica did not exit cleanly: {status:?}");
    }

    let store = PostgresStore::connect(&url).expect("connect");
    let rows = store.records_since(0).expect("read");
    let mut ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["replica-0", "replica-1", "replica-2"]);
    assert!(rows.iter().all(|r| r.model == QWEN && r.status == 200 && r.input_tokens > 0));

    // `tierd report` reads the same rows, with the password from PGPASSWORD.
    let output = Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(["report", "--by", "workflow", "--format", "json", "--db"])
        .arg(url.replace(&format!(":{PASSWORD}@"), "@"))
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("run tierd report");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("report JSON");
    assert_eq!(report["total"]["requests"], 3, "{report}");
    let input: u64 = rows.iter().map(|r| r.input_tokens).sum();
    assert_eq!(report["total"]["input_tokens"], input, "{report}");
    assert_eq!(report["rows"][0]["key"], "shared", "{report}");
}

#[test]
fn missing_url_variable_stops_the_server() {
    let config = replica_config().replace("TIERD_TEST_AUDIT_URL", "TIERD_TEST_UNSET_AUDIT_URL");
    let error = Server::try_start("postgres-unset-url", &config).err().expect("the server must not start");
    assert!(error.contains("TIERD_TEST_UNSET_AUDIT_URL"), "{error}");
}
