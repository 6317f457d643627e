//! `http`: an HTTP request made with curl inside the target node. Also the
//! expectations every HTTP check is judged by (`host_forward` makes its
//! request from the host), and the clients both use.

use super::{Check, Ctx, Verdict};
use crate::guest::Guest;
use crate::text::{excerpt, shell_quote};
use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    url: String,
    #[serde(default)]
    expect: HttpExpect,
}

impl Check for Http {
    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let guest = ctx.guest(target)?;
        let evidence = json!({ "from": guest.endpoint.node, "url": self.url });
        Ok(match curl(&guest, &self.url, "", budget)? {
            Ok((status, body)) => judge(status, &body, &self.expect, evidence),
            Err(e) => Verdict::fail(e, evidence),
        })
    }
}

/// What a response must look like.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpExpect {
    #[serde(default = "crate::spec::default::u16::<200>")]
    pub status: u16,
    pub body_contains: Option<String>,
    /// A JSON pointer into the body (`/health`), compared with `json_equals`.
    pub json_pointer: Option<String>,
    pub json_equals: Option<Value>,
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

/// `curl` inside the guest; the status comes back on the last line. The
/// outer error is the SSH transport's (the session broke); the inner one is
/// curl's own failure (refused, timed out), which is a verdict.
pub fn curl(
    guest: &Guest,
    url: &str,
    extra: &str,
    budget: Duration,
) -> Result<Result<(u16, String), String>> {
    let secs = budget.as_secs().clamp(1, 60);
    let out = guest.exec(
        &format!(
            "curl -sS -m {secs} {extra} -w '\\n%{{http_code}}' {}",
            shell_quote(url)
        ),
        budget + Duration::from_secs(5),
    )?;
    if out.code != 0 {
        return Ok(Err(format!("curl {url}: {}", out.stderr.trim())));
    }
    let (body, code) = out
        .stdout
        .rsplit_once('\n')
        .ok_or_else(|| anyhow!("curl {url}: no status line"))?;
    match code.trim().parse() {
        Ok(code) => Ok(Ok((code, body.to_string()))),
        Err(_) => Ok(Err(format!("curl {url}: status {code:?} is not a number"))),
    }
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
