//! `tierd report`: totals of the audit trail, grouped by tier, task, workflow, model or day.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::audit::report::{build, GroupBy, Report, ReportRow};
use crate::audit::config::open_for_reading;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

pub struct ReportArgs {
    /// SQLite file, or `postgres://` URL.
    pub db: String,
    /// Window ending now, such as 7d or 12h.
    pub since: Duration,
    pub by: GroupBy,
    pub format: Format,
    /// Workflows listed as top token consumers.
    pub top: usize,
}

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let store = open_for_reading(&args.db)?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_millis();
    let since_ms = i64::try_from(now_ms.saturating_sub(args.since.as_millis())).unwrap_or(0);
    let records = store.records_since(since_ms)?;
    let report = build(&records, args.by, args.top);

    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Format::Csv => write_csv(&mut out, &report)?,
        Format::Table => write_table(&mut out, &report, args.by)?,
    }
    Ok(())
}

const HEADER: [&str; 12] = [
    "key",
    "requests",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "counterfactual_usd",
    "saving_usd",
    "saving_pct",
    "escalation_rate",
    "p50_ms",
    "p95_ms",
    "over_budget",
];

fn cells(row: &ReportRow) -> [String; 12] {
    [
        printable(&row.key),
        row.requests.to_string(),
        row.input_tokens.to_string(),
        row.output_tokens.to_string(),
        format!("{:.6}", row.cost_usd),
        format!("{:.6}", row.counterfactual_usd),
        format!("{:.6}", row.saving_usd),
        row.saving_pct.map_or_else(|| "-".into(), |pct| format!("{pct:.1}")),
        format!("{:.3}", row.escalation_rate),
        format!("{:.1}", row.p50_ms),
        format!("{:.1}", row.p95_ms),
        row.over_budget.to_string(),
    ]
}

/// Escapes control characters in a client-chosen key, such as a workflow name, so that it
/// cannot move the cursor, recolour the terminal or break a table row.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() { c.escape_default().collect() } else { vec![c] };
            escaped
        })
        .collect()
}

/// Quotes a CSV field when it contains a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn write_csv(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    writeln!(out, "{}", HEADER.join(","))?;
    for row in report.rows.iter().chain(std::iter::once(&report.total)) {
        // CSV quoting keeps any text intact, so the key goes out unescaped.
        let mut fields = cells(row);
        fields[0] = row.key.clone();
        let line: Vec<String> = fields.iter().map(|cell| csv_field(cell)).collect();
        writeln!(out, "{}", line.join(","))?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, report: &Report, by: GroupBy) -> std::io::Result<()> {
    let mut rows: Vec<[String; 12]> = report.rows.iter().map(cells).collect();
    rows.push(cells(&report.total));
    let mut header = HEADER.map(str::to_string);
    header[0] = format!("{by:?}").to_lowercase();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, width))| if i == 0 { format!("{cell:<width$}") } else { format!("{cell:>width$}") })
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(&header))?;
    for row in &rows {
        writeln!(out, "{}", line(row))?;
    }

    if !report.top_consumers.is_empty() {
        writeln!(out, "\ntop token consumers by workflow:")?;
        writeln!(
            out,
            "{:<24} {:>9} {:>13} {:>17} {:>12} {:>11}",
            "workflow", "requests", "total_tokens", "mean_input_tokens", "cost_usd", "over_budget"
        )?;
        for consumer in &report.top_consumers {
            writeln!(
                out,
                "{:<24} {:>9} {:>13} {:>17.1} {:>12.6} {:>11}",
                printable(&consumer.workflow),
                consumer.requests,
                consumer.total_tokens,
                consumer.mean_input_tokens,
                consumer.cost_usd,
                consumer.over_budget
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("\u{1b}[2Jred"), "\\u{1b}[2Jred");
        assert_eq!(printable("two\nlines"), "two\\nlines");
        assert_eq!(printable("café"), "café");
    }
}
