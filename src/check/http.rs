//! HTTP surfaces: requested with curl inside a guest, or from the host
//! through a forward with ureq. Both are judged by the same expectations.

use super::{Ctx, Verdict, shell_quote};
use crate::guest::Guest;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

/// What a response must look like.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpExpect {
    #[serde(default = "ok")]
    pub status: u16,
    pub body_contains: Option<String>,
    /// A JSON pointer into the body (`/health`), compared with `json_equals`.
    pub json_pointer: Option<String>,
    pub json_equals: Option<Value>,
}

fn ok() -> u16 {
    200
}

impl Default for HttpExpect {
    fn default() -> Self {
        HttpExpect {
            status: 200,
            body_contains: None,
            json_pointer: None,
            json_equals: None,
        }
    }
}

/// Judges one response.
pub fn judge(status: u16, body: &str, expect: &HttpExpect, mut evidence: Value) -> Verdict {
    evidence["status"] = json!(status);
    evidence["body"] = json!(excerpt(body, 600));
    if status != expect.status {
        return Verdict::fail(
            format!("HTTP {status} (expected {})", expect.status),
            evidence,
        );
    }
    if let Some(want) = &expect.body_contains
        && !body.contains(want.as_str())
    {
        return Verdict::fail(format!("body lacks {want:?}"), evidence);
    }
    if let Some(pointer) = &expect.json_pointer {
        let doc: Value = match serde_json::from_str(body) {
            Ok(d) => d,
            Err(e) => return Verdict::fail(format!("body is not JSON: {e}"), evidence),
        };
        let got = doc.pointer(pointer).cloned().unwrap_or(Value::Null);
        evidence["json"] = json!({ "pointer": pointer, "value": got });
        if let Some(want) = &expect.json_equals
            && got != *want
        {
            return Verdict::fail(format!("{pointer} is {got}, expected {want}"), evidence);
        }
        if got.is_null() {
            return Verdict::fail(format!("{pointer} is missing"), evidence);
        }
    }
    Verdict::pass(format!("HTTP {status}"), evidence)
}

/// `curl` inside the guest; the status comes back on the last line.
pub fn curl(guest: &Guest, url: &str, extra: &str, budget: Duration) -> Result<(u16, String)> {
    let secs = budget.as_secs().clamp(1, 60);
    let out = guest.exec(
        &format!(
            "curl -sS -m {secs} {extra} -w '\\n%{{http_code}}' {}",
            shell_quote(url)
        ),
        budget + Duration::from_secs(5),
    )?;
    if out.code != 0 {
        bail!("curl {url}: {}", out.stderr.trim());
    }
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .ok_or_else(|| anyhow!("curl {url}: no status line"))?;
    Ok((
        code.trim().parse().context("curl status")?,
        body.to_string(),
    ))
}

pub fn in_guest(
    guest: &Guest,
    url: &str,
    expect: &HttpExpect,
    budget: Duration,
) -> Result<Verdict> {
    let evidence = json!({ "from": guest.endpoint.node, "url": url });
    Ok(match curl(guest, url, "", budget) {
        Ok((status, body)) => judge(status, &body, expect, evidence),
        Err(e) => Verdict::fail(format!("{e:#}"), evidence),
    })
}

/// An HTTP client for requests from the host: every status is a response
/// to judge, not an error, and no request outlives `budget` (or 30 s).
pub fn host_agent(budget: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(budget.min(Duration::from_secs(30))))
        .http_status_as_error(false)
        .build()
        .into()
}

/// A GET from the host to 127.0.0.1:<forward's host port><path>.
pub fn from_host(
    ctx: &Ctx,
    node: &str,
    forward: &str,
    path: &str,
    expect: &HttpExpect,
    budget: Duration,
) -> Result<Verdict> {
    let fwd = ctx.forward(node, forward)?;
    let url = format!("http://127.0.0.1:{}{path}", fwd.host);
    let evidence = json!({ "url": url, "forward": format!("{node}/{forward} {fwd}") });
    Ok(match host_agent(budget).get(&url).call() {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            judge(status, &body, expect, evidence)
        }
        Err(e) => Verdict::fail(format!("{url}: {e}"), evidence),
    })
}

fn excerpt(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Outcome;

    #[test]
    fn judges_status_body_and_json_field() {
        let e = HttpExpect {
            json_pointer: Some("/health".into()),
            json_equals: Some(json!("true")),
            ..HttpExpect::default()
        };
        let v = judge(200, r#"{"health":"true"}"#, &e, json!({}));
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.message);
        let v = judge(200, r#"{"health":"false"}"#, &e, json!({}));
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.message.contains("/health"), "{}", v.message);
        let v = judge(503, "", &HttpExpect::default(), json!({}));
        assert_eq!(v.message, "HTTP 503 (expected 200)");
        let body = HttpExpect {
            body_contains: Some("ok".into()),
            ..HttpExpect::default()
        };
        assert_eq!(judge(200, "nope", &body, json!({})).outcome, Outcome::Fail);
    }
}
