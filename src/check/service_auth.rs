//! Service authentication, proven from the services' own state: the
//! provider refuses anonymous requests, and Prometheus (the consumer)
//! reports its scrape target for the job as up, which it can only be if its
//! credentials were accepted. A running process proves neither.

use super::{Check, Ctx, Verdict, http::curl};
use crate::guest::Guest;
use anyhow::Result;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// `service_auth`: a consumer authenticated to its provider, proven by
/// Prometheus' own scrape state for `job`, and by `protected_url` refusing
/// anonymous access.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAuth {
    job: String,
    #[serde(default = "prometheus_url")]
    prometheus: String,
    protected_url: String,
}

fn prometheus_url() -> String {
    "http://127.0.0.1:9090".into()
}

impl Check for ServiceAuth {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        prometheus_job(
            &*ctx.guest(target)?,
            &self.job,
            &self.prometheus,
            &self.protected_url,
            budget,
        )
    }
}

pub fn prometheus_job(
    guest: &Guest,
    job: &str,
    prometheus: &str,
    protected_url: &str,
    budget: Duration,
) -> Result<Verdict> {
    let mut evidence = json!({ "job": job, "protected_url": protected_url });
    let anonymous = match curl(guest, protected_url, "-o /dev/null", budget)? {
        Ok((status, _)) => status,
        Err(e) => return Ok(Verdict::fail(e, evidence)),
    };
    evidence["anonymous_status"] = json!(anonymous);
    if anonymous != 401 {
        return Ok(Verdict::fail(
            format!(
                "{protected_url} answered {anonymous} without credentials: the provider does \
                 not enforce auth, so a healthy scrape proves nothing"
            ),
            evidence,
        ));
    }
    let url = format!("{prometheus}/api/v1/targets?state=active");
    let (status, body) = match curl(guest, &url, "", budget)? {
        Ok(r) => r,
        Err(e) => return Ok(Verdict::fail(e, evidence)),
    };
    if status != 200 {
        return Ok(Verdict::fail(format!("{url}: HTTP {status}"), evidence));
    }
    let doc: Value = serde_json::from_str(&body)?;
    let targets: Vec<&Value> = doc
        .pointer("/data/activeTargets")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter(|t| t["labels"]["job"] == job).collect())
        .unwrap_or_default();
    evidence["targets"] = json!(
        targets
            .iter()
            .map(|t| json!({
                "scrapeUrl": t["scrapeUrl"],
                "health": t["health"],
                "lastScrape": t["lastScrape"],
                "lastError": t["lastError"],
            }))
            .collect::<Vec<_>>()
    );
    if targets.is_empty() {
        return Ok(Verdict::fail(
            format!("Prometheus has no target for job {job:?}"),
            evidence,
        ));
    }
    let down: Vec<String> = targets
        .iter()
        .filter(|t| t["health"] != "up")
        .map(|t| format!("{} is {} ({})", t["scrapeUrl"], t["health"], t["lastError"]))
        .collect();
    if !down.is_empty() {
        return Ok(Verdict::fail(down.join("; "), evidence));
    }
    Ok(Verdict::pass(
        format!(
            "anonymous request refused (401); Prometheus scrapes job {job} with credentials: \
             {} target(s) up",
            targets.len()
        ),
        evidence,
    ))
}
