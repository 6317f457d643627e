//! DNS: one query over UDP from the host, through the node's UDP forward,
//! encoded and decoded with hickory-proto.

use super::{Check, Ctx, Verdict, require_forward};
use crate::spec::{Cluster, Proto};
use serde::Deserialize;

/// `dns`: a query over UDP from the host through the target's UDP forward.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default = "dns_forward")]
    forward: String,
    /// The name to look up (`name` is the check's own name).
    query: String,
    #[serde(default = "record_a")]
    record: String,
    expect: Vec<String>,
    #[serde(default = "yes")]
    authoritative: bool,
}

fn dns_forward() -> String {
    "dns".into()
}
fn record_a() -> String {
    "A".into()
}
fn yes() -> bool {
    true
}

impl Check for Dns {
    fn bind(&mut self, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        require_forward(target, cluster, &self.forward, Proto::Udp)
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        query(
            ctx,
            ctx.node(target)?,
            &self.forward,
            &self.query,
            &self.record,
            &self.expect,
            self.authoritative,
            budget,
        )
    }
}

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use serde_json::json;
use std::net::{Ipv4Addr, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

#[allow(clippy::too_many_arguments)]
pub fn query(
    ctx: &Ctx,
    node: &str,
    forward: &str,
    name: &str,
    record: &str,
    expect: &[String],
    authoritative: bool,
    budget: Duration,
) -> Result<Verdict> {
    let fwd = ctx.forward(node, forward)?;
    let rtype = RecordType::from_str(record).with_context(|| format!("record type {record:?}"))?;
    let qname = Name::from_ascii(name).with_context(|| format!("DNS name {name:?}"))?;

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = (std::process::id() as u16) ^ (nanos as u16);
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(false)
        .add_query(Query::query(qname, rtype));
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sock.set_read_timeout(Some(
        budget.clamp(Duration::from_millis(200), Duration::from_secs(5)),
    ))?;
    let server = (Ipv4Addr::LOCALHOST, fwd.host);
    let started = Instant::now();
    sock.send_to(&msg.to_vec()?, server)?;
    let mut buf = [0u8; 4096];
    let mut evidence = json!({
        "server": format!("{node}/{forward} 127.0.0.1:{} (udp)", fwd.host),
        "question": format!("{name} {record}"),
    });
    let n = match sock.recv(&mut buf) {
        Ok(n) => n,
        Err(e) => return Ok(Verdict::fail(format!("no answer over UDP: {e}"), evidence)),
    };
    let resp = Message::from_vec(&buf[..n]).context("decoding the DNS response")?;
    let answers: Vec<String> = resp
        .answers()
        .iter()
        .filter(|r| r.record_type() == rtype)
        .map(|r| r.data().to_string())
        .collect();
    evidence["rcode"] = json!(resp.response_code().to_string());
    evidence["authoritative"] = json!(resp.authoritative());
    evidence["answers"] = json!(answers);
    evidence["rtt_ms"] = json!(started.elapsed().as_millis() as u64);
    if resp.id() != id {
        return Ok(Verdict::fail(
            "response id does not match the query",
            evidence,
        ));
    }
    if authoritative && !resp.authoritative() {
        return Ok(Verdict::fail(
            "answer is not authoritative (AA unset)",
            evidence,
        ));
    }
    let missing: Vec<&String> = expect.iter().filter(|e| !answers.contains(e)).collect();
    if !missing.is_empty() {
        return Ok(Verdict::fail(
            format!(
                "{} -> {:?} ({}), expected {:?}",
                name,
                answers,
                resp.response_code(),
                missing
            ),
            evidence,
        ));
    }
    Ok(Verdict::pass(
        format!("{name} {record} -> {}", answers.join(", ")),
        evidence,
    ))
}
