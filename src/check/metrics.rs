//! Prometheus text endpoints: fetched with curl inside the guest, parsed
//! with prometheus-parse, judged on a series and an optional condition.

use super::{Check, Ctx, Verdict, http::curl};
use crate::guest::Guest;
use anyhow::{Result, anyhow, bail};
use prometheus_parse::{Sample, Scrape, Value};
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// `metrics`: a Prometheus text endpoint (fetched with curl in the target)
/// has a series, optionally with a value condition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    url: String,
    series: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// `> 0`, `>= 1`, `== 1`, `< 5`, `!= 0`, `<= 3`.
    condition: Option<String>,
}

impl Check for Metrics {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        series(
            &*ctx.guest(target)?,
            &self.url,
            &self.series,
            &self.labels,
            self.condition.as_deref(),
            budget,
        )
    }
}

pub fn series(
    guest: &Guest,
    url: &str,
    series: &str,
    labels: &BTreeMap<String, String>,
    condition: Option<&str>,
    budget: Duration,
) -> Result<Verdict> {
    let mut evidence =
        json!({ "from": guest.endpoint.node, "url": url, "series": series, "labels": labels });
    let (status, body) = match curl(guest, url, "", budget)? {
        Ok(r) => r,
        Err(e) => return Ok(Verdict::fail(e, evidence)),
    };
    evidence["status"] = json!(status);
    if status != 200 {
        return Ok(Verdict::fail(format!("HTTP {status}"), evidence));
    }
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?;
    evidence["samples_total"] = json!(scrape.samples.len());
    let matching: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == series && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .collect();
    let values: Vec<f64> = matching.iter().filter_map(|s| scalar(&s.value)).collect();
    evidence["values"] = json!(values);
    if matching.is_empty() {
        return Ok(Verdict::fail(
            format!("no series {series}{labels:?}"),
            evidence,
        ));
    }
    let Some(cond) = condition else {
        return Ok(Verdict::pass(
            format!("{series}: {} series", matching.len()),
            evidence,
        ));
    };
    let (op, bound) = parse_condition(cond)?;
    evidence["condition"] = json!(cond);
    match values.iter().find(|v| !op.holds(**v, bound)) {
        Some(v) => Ok(Verdict::fail(
            format!("{series} = {v}, expected {cond}"),
            evidence,
        )),
        None if values.is_empty() => Ok(Verdict::fail(
            format!("{series} has no scalar value to compare"),
            evidence,
        )),
        None => Ok(Verdict::pass(
            format!("{series} {cond} (values {values:?})"),
            evidence,
        )),
    }
}

fn scalar(v: &Value) -> Option<f64> {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => Some(*x),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    pub fn holds(self, v: f64, bound: f64) -> bool {
        match self {
            Op::Gt => v > bound,
            Op::Ge => v >= bound,
            Op::Lt => v < bound,
            Op::Le => v <= bound,
            Op::Eq => v == bound,
            Op::Ne => v != bound,
        }
    }
}

/// `"> 0"`, `">= 1.5"`, `"== 1"`: an operator and a number.
pub fn parse_condition(s: &str) -> Result<(Op, f64)> {
    let s = s.trim();
    let ops = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        (">", Op::Gt),
        ("<", Op::Lt),
    ];
    for (text, op) in ops {
        if let Some(rest) = s.strip_prefix(text) {
            let n: f64 = rest
                .trim()
                .parse()
                .map_err(|_| anyhow!("condition {s:?}: {rest:?} is not a number"))?;
            return Ok((op, n));
        }
    }
    bail!("condition {s:?}: expected one of >, >=, <, <=, ==, != and a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_and_hold() {
        let (op, n) = parse_condition(">= 3").unwrap();
        assert!(op.holds(3.0, n) && !op.holds(2.0, n));
        let (op, n) = parse_condition("== 1").unwrap();
        assert!(op.holds(1.0, n));
        assert!(parse_condition("about 3").is_err());
        assert!(parse_condition("> x").is_err());
    }
}
