//! Aggregates of audit records for `tierd report`: totals by tier, task, workflow, model or day,
//! and the workflows that consume the most tokens.

use std::collections::BTreeMap;

use serde::Serialize;

use super::record::AuditRecord;

/// Field that the rows of a report are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    Tier,
    Task,
    Workflow,
    Model,
    /// Name of the client key.
    Client,
    /// Calendar day in UTC.
    Day,
}

/// Totals of one group of records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    pub key: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub counterfactual_usd: f64,
    /// `counterfactual_usd - cost_usd`.
    pub saving_usd: f64,
    /// Saving as a percentage of the counterfactual cost; `None` when that cost is 0.
    pub saving_pct: Option<f64>,
    /// Share of requests that left the local tier.
    pub escalation_rate: f64,
    /// Latency percentiles of the requests that got status 200.
    pub p50_ms: f64,
    pub p95_ms: f64,
    /// Requests whose prompt exceeded their workflow's token budget.
    pub over_budget: u64,
}

/// A workflow's token use, to find oversized prompts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Consumer {
    pub workflow: String,
    pub requests: u64,
    pub total_tokens: u64,
    pub mean_input_tokens: f64,
    pub cost_usd: f64,
    /// Requests whose prompt exceeded the workflow's token budget.
    pub over_budget: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub rows: Vec<ReportRow>,
    pub total: ReportRow,
    pub top_consumers: Vec<Consumer>,
}

/// Key of records without a value for the grouping field.
const NONE_KEY: &str = "(none)";

fn key(record: &AuditRecord, by: GroupBy) -> String {
    match by {
        GroupBy::Tier => tier_key(record.tier),
        GroupBy::Task => record.task.clone().unwrap_or_else(|| NONE_KEY.into()),
        GroupBy::Workflow => record.workflow.clone().unwrap_or_else(|| NONE_KEY.into()),
        GroupBy::Model => format!("{}/{}", record.provider, record.model),
        GroupBy::Client => record.client.clone().unwrap_or_else(|| NONE_KEY.into()),
        GroupBy::Day => day(record.time_ms),
    }
}

/// Key of tier 0, which requests rejected before any model served them have.
pub const UNSERVED_KEY: &str = "none";

fn tier_key(tier: u8) -> String {
    if tier == 0 {
        UNSERVED_KEY.into()
    } else {
        tier.to_string()
    }
}

/// Formats a Unix time in milliseconds as its UTC date, `YYYY-MM-DD`; times before the epoch
/// count as the epoch.
fn day(time_ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms.max(0) as u64);
    let mut text = humantime::format_rfc3339(time).to_string();
    text.truncate(10);
    text
}

/// Returns the `q` quantile of sorted `values` by linear interpolation, or 0 when empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let position = q * (sorted.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    let weight = position - low as f64;
    sorted[low] * (1.0 - weight) + sorted[high] * weight
}

fn row(key: String, records: &[&AuditRecord]) -> ReportRow {
    // Adding 0.0 turns the -0.0 that an empty f64 sum starts from into 0.0.
    let sum = |f: fn(&AuditRecord) -> f64| records.iter().map(|r| f(r)).sum::<f64>() + 0.0;
    let cost_usd = sum(|r| r.cost_usd);
    let counterfactual_usd = sum(|r| r.counterfactual_usd);
    // Rejected requests return in a fraction of a millisecond, so latency covers the requests
    // that got status 200 only.
    let mut latencies: Vec<f64> = records.iter().filter(|r| r.status == 200).map(|r| r.total_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let escalated = records.iter().filter(|r| (1..3).contains(&r.tier)).count();
    let requests = records.len() as u64;
    ReportRow {
        key,
        requests,
        input_tokens: records.iter().map(|r| r.input_tokens).sum(),
        output_tokens: records.iter().map(|r| r.output_tokens).sum(),
        cost_usd,
        counterfactual_usd,
        saving_usd: counterfactual_usd - cost_usd + 0.0,
        saving_pct: (counterfactual_usd > 0.0).then(|| 100.0 * (counterfactual_usd - cost_usd) / counterfactual_usd),
        escalation_rate: if requests == 0 { 0.0 } else { escalated as f64 / requests as f64 },
        p50_ms: quantile(&latencies, 0.5),
        p95_ms: quantile(&latencies, 0.95),
        over_budget: over_budget(records),
    }
}

fn over_budget(records: &[&AuditRecord]) -> u64 {
    records.iter().filter(|r| r.over_budget.is_some()).count() as u64
}

/// Builds the report of `records` grouped `by`, with the `top` largest token consumers.
pub fn build(records: &[AuditRecord], by: GroupBy, top: usize) -> Report {
    let mut groups: BTreeMap<String, Vec<&AuditRecord>> = BTreeMap::new();
    for record in records {
        groups.entry(key(record, by)).or_default().push(record);
    }
    let rows = groups.into_iter().map(|(key, group)| row(key, &group)).collect();
    let all: Vec<&AuditRecord> = records.iter().collect();

    let mut workflows: BTreeMap<String, Vec<&AuditRecord>> = BTreeMap::new();
    for record in records {
        workflows.entry(key(record, GroupBy::Workflow)).or_default().push(record);
    }
    let mut top_consumers: Vec<Consumer> = workflows
        .into_iter()
        .map(|(workflow, group)| {
            let input: u64 = group.iter().map(|r| r.input_tokens).sum();
            let output: u64 = group.iter().map(|r| r.output_tokens).sum();
            Consumer {
                workflow,
                requests: group.len() as u64,
                total_tokens: input + output,
                mean_input_tokens: input as f64 / group.len() as f64,
                cost_usd: group.iter().map(|r| r.cost_usd).sum(),
                over_budget: over_budget(&group),
            }
        })
        .collect();
    top_consumers.sort_by(|a, b| b.total_tokens.cmp(&a.total_tokens).then_with(|| a.workflow.cmp(&b.workflow)));
    top_consumers.truncate(top);

    Report {
        rows,
        total: row("total".into(), &all),
        top_consumers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tier: u8, workflow: &str, input: u64, cost: f64, counterfactual: f64, ms: f64) -> AuditRecord {
        AuditRecord {
            tier,
            workflow: Some(workflow.into()),
            provider: if tier == 3 { "local".into() } else { "openai".into() },
            model: if tier == 3 { "qwen".into() } else { "mini".into() },
            input_tokens: input,
            output_tokens: 10,
            cost_usd: cost,
            counterfactual_usd: counterfactual,
            total_ms: ms,
            time_ms: 1_796_437_661_000,
            status: 200,
            ..Default::default()
        }
    }

    #[test]
    fn totals_savings_and_percentiles() {
        let records = vec![
            record(3, "support", 100, 0.0, 0.001, 10.0),
            record(3, "support", 300, 0.0, 0.003, 20.0),
            record(2, "billing", 1_000, 0.002, 0.01, 30.0),
            record(1, "billing", 2_000, 0.02, 0.02, 40.0),
        ];
        let report = build(&records, GroupBy::Tier, 10);
        let keys: Vec<&str> = report.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["1", "2", "3"]);

        let total = &report.total;
        assert_eq!(total.requests, 4);
        assert_eq!(total.input_tokens, 3_400);
        assert!((total.cost_usd - 0.022).abs() < 1e-12);
        assert!((total.saving_usd - (0.034 - 0.022)).abs() < 1e-12);
        assert!((total.saving_pct.unwrap() - 100.0 * 0.012 / 0.034).abs() < 1e-9);
        assert_eq!(total.escalation_rate, 0.5);
        assert_eq!(total.p50_ms, 25.0);
        assert!((total.p95_ms - 38.5).abs() < 1e-9);

        assert_eq!(report.top_consumers[0].workflow, "billing");
        assert_eq!(report.top_consumers[0].mean_input_tokens, 1_500.0);
        assert_eq!(report.top_consumers[1].total_tokens, 420);
    }

    #[test]
    fn unserved_rows_keyed_apart() {
        let mut rejected = record(3, "x", 0, 0.0, 0.0, 0.1);
        rejected.tier = 0;
        rejected.status = 401;
        let mut served = record(3, "x", 5, 0.0, 0.0, 500.0);
        served.status = 200;
        let report = build(&[rejected, served], GroupBy::Tier, 5);
        let keys: Vec<&str> = report.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["3", "none"]);
        assert_eq!(report.total.p50_ms, 500.0);
        assert_eq!(report.total.escalation_rate, 0.0);
    }

    #[test]
    fn empty_report_has_no_negative_zero() {
        let report = build(&[], GroupBy::Tier, 5);
        assert!(report.total.cost_usd.is_sign_positive());
        assert!(report.total.saving_usd.is_sign_positive());
        assert_eq!(format!("{:.6}", report.total.counterfactual_usd), "0.000000");
    }

    #[test]
    fn days_are_utc_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(951_782_400_000), "2000-02-29");
        assert_eq!(day(1_796_437_661_000), "2026-12-05");
        assert_eq!(day(-1), "1970-01-01");
    }

    #[test]
    fn free_counterfactual_has_no_saving_percentage() {
        let report = build(&[record(3, "x", 1, 0.0, 0.0, 1.0)], GroupBy::Workflow, 5);
        assert_eq!(report.total.saving_pct, None);
    }
}
