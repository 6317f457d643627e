//! DNS: one query over UDP from the host, through the node's UDP forward,
//! encoded and decoded with hickory-proto.

use super::{Check, Ctx, Verdict, require_forward};
use crate::spec::{Cluster, Proto};
use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde::Deserialize;
use serde_json::json;
use std::net::{Ipv4Addr, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

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
    #[serde(default = "crate::spec::default::yes")]
    authoritative: bool,
}

fn dns_forward() -> String {
    "dns".into()
}
fn record_a() -> String {
    "A".into()
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
    let mut evidence = json!({
        "server": format!("{node}/{forward} 127.0.0.1:{} (udp)", fwd.host),
        "question": format!("{name} {record}"),
    });
    let timeout = budget.clamp(Duration::from_millis(200), Duration::from_secs(5));
    let resp = match ask(fwd.host, &qname, rtype, timeout) {
        Ok(r) => r,
        Err(e) => return Ok(Verdict::fail(format!("{e:#}"), evidence)),
    };
    evidence["rcode"] = json!(resp.rcode.to_string());
    evidence["authoritative"] = json!(resp.authoritative);
    evidence["answers"] = json!(resp.answers);
    evidence["rtt_ms"] = json!(resp.rtt.as_millis() as u64);
    if authoritative && !resp.authoritative {
        return Ok(Verdict::fail(
            "answer is not authoritative (AA unset)",
            evidence,
        ));
    }
    let answers = &resp.answers;
    let missing: Vec<&String> = expect.iter().filter(|e| !answers.contains(e)).collect();
    if !missing.is_empty() {
        return Ok(Verdict::fail(
            format!(
                "{} -> {:?} ({}), expected {:?}",
                name, answers, resp.rcode, missing
            ),
            evidence,
        ));
    }
    Ok(Verdict::pass(
        format!("{name} {record} -> {}", answers.join(", ")),
        evidence,
    ))
}

/// One response to one query, as the DNS checks judge it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    /// The data of the answer records of the type asked for.
    pub answers: Vec<String>,
    /// The zone's SOA serial, when the response carries its SOA (asked
    /// for, or in the authority section of a negative answer).
    pub serial: Option<u32>,
    pub rtt: Duration,
}

/// Asks a node's UDP forward on 127.0.0.1:`port` for `name` `rtype`,
/// without recursion (the servers are authoritative).
pub fn ask(port: u16, name: &Name, rtype: RecordType, timeout: Duration) -> Result<Answer> {
    // Random per query, so a late answer to an earlier one cannot pass.
    let id = fastrand::u16(..);
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(false)
        .add_query(Query::query(name.clone(), rtype));
    let started = Instant::now();
    let bytes = exchange(port, &msg.to_vec()?, id, timeout)?;
    let rtt = started.elapsed();
    let resp = Message::from_vec(&bytes).context("decoding the DNS response")?;
    let serial = resp
        .answers()
        .iter()
        .chain(resp.name_servers())
        .find_map(|r| match r.data() {
            RData::SOA(soa) => Some(soa.serial()),
            _ => None,
        });
    Ok(Answer {
        rcode: resp.response_code(),
        authoritative: resp.authoritative(),
        answers: resp
            .answers()
            .iter()
            .filter(|r| r.record_type() == rtype)
            .map(|r| r.data().to_string())
            .collect(),
        serial,
        rtt,
    })
}

/// Sends one DNS message (whose id is `id`) to 127.0.0.1:`port` over UDP
/// and returns the response as received (TSIG is checked on these bytes).
pub fn exchange(port: u16, request: &[u8], id: u16, timeout: Duration) -> Result<Vec<u8>> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    // A zero timeout would mean "block forever" to the socket.
    sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    sock.send_to(request, (Ipv4Addr::LOCALHOST, port))?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).context("no answer over UDP")?;
    if n < 12 {
        bail!("a {n}-byte answer is no DNS message");
    }
    let got = u16::from_be_bytes([buf[0], buf[1]]);
    if got != id {
        bail!("response id {got} does not match the query's {id}");
    }
    Ok(buf[..n].to_vec())
}
