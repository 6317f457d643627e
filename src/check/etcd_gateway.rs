//! A small client of etcd's JSON gateway (`/v3/kv/put`, `/v3/kv/range`),
//! used from the host through a member's forward: no process start per
//! request, so a workload keeps its rate even when the guests are slow
//! (under TCG an `etcdctl` in the guest costs seconds).

use crate::history::Ack;
use anyhow::{Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;

pub struct Gateway {
    agent: ureq::Agent,
    base: String,
}

impl Gateway {
    /// A client of the gateway on 127.0.0.1:`port`; no request outlives `timeout`.
    pub fn new(port: u16, timeout: Duration) -> Gateway {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Gateway {
            agent,
            base: format!("http://127.0.0.1:{port}/v3/kv"),
        }
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, ureq::Error> {
        let mut resp = self
            .agent
            .post(&format!("{}/{path}", self.base))
            .send(body.to_string().as_bytes())?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string()?;
        let doc: Value = serde_json::from_str(&text).unwrap_or(json!({ "error": text }));
        if status != 200 || doc.get("error").is_some() {
            return Err(ureq::Error::Other(
                format!(
                    "HTTP {status}: {}",
                    doc["error"].as_str().unwrap_or(text.trim())
                )
                .into(),
            ));
        }
        Ok(doc)
    }

    /// Writes `key`; returns what the client learned, and the error text.
    pub fn put(&self, key: &str, value: &str) -> (Ack, String) {
        let body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        match self.post("put", &body) {
            Ok(doc) if doc.get("header").is_some() => (Ack::Acknowledged, String::new()),
            Ok(doc) => (Ack::Indeterminate, format!("unexpected answer {doc}")),
            Err(e) => (classify(&e), e.to_string()),
        }
    }

    /// The keys under `prefix`. A serializable read is served by the member
    /// from its own copy; a linearizable one needs the leader.
    pub fn keys(&self, prefix: &str, serializable: bool) -> Result<BTreeSet<String>> {
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "keys_only": true,
            "serializable": serializable,
        });
        let doc = self.post("range", &body).map_err(|e| anyhow!("{e}"))?;
        let kvs = doc["kvs"].as_array().cloned().unwrap_or_default();
        kvs.iter()
            .map(|kv| {
                let raw = B64.decode(kv["key"].as_str().unwrap_or_default())?;
                Ok(String::from_utf8(raw)?)
            })
            .collect()
    }

    /// A linearizable read of one key; Ok when the member could serve it.
    pub fn linearizable_read(&self, key: &str) -> Result<()> {
        let body = json!({ "key": B64.encode(key) });
        match self.post("range", &body) {
            Ok(_) => Ok(()),
            Err(e) => bail!("{e}"),
        }
    }
}

/// The end of etcd's range for a prefix: the prefix with its last byte + 1.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What a failed write means. Only an answer that came before the write
/// could be proposed is a refusal: the connection was refused, or the
/// member said it has no leader. Timeouts and cut connections may have
/// been applied.
fn classify(e: &ureq::Error) -> Ack {
    let refused = match e {
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        ureq::Error::ConnectionFailed => true,
        other => other.to_string().contains("etcdserver: no leader"),
    };
    if refused {
        Ack::Refused
    } else {
        Ack::Indeterminate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_its_last_byte() {
        assert_eq!(prefix_end("photon/a/"), b"photon/a0");
        assert_eq!(prefix_end("k"), b"l");
    }

    #[test]
    fn only_answers_before_a_proposal_are_refusals() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify(&ureq::Error::Io(refused)), Ack::Refused);
        let no_leader = ureq::Error::Other("HTTP 503: etcdserver: no leader".into());
        assert_eq!(classify(&no_leader), Ack::Refused);
        let timeout = ureq::Error::Other("HTTP 503: etcdserver: request timed out".into());
        assert_eq!(classify(&timeout), Ack::Indeterminate);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(classify(&ureq::Error::Io(reset)), Ack::Indeterminate);
    }

    #[test]
    fn a_member_that_is_not_listening_refuses_and_reads_fail() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let g = Gateway::new(port, Duration::from_secs(2));
        assert_eq!(g.put("k", "v").0, Ack::Refused);
        assert!(g.keys("k", true).is_err());
        assert!(g.linearizable_read("k").is_err());
    }
}
