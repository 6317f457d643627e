//! Dynamic DNS: a record created and removed at runtime through RFC 2136
//! updates to the primary, signed with the cluster's TSIG key
//! (`provision::dns`), and its arrival on and departure from every server.
//!
//! From the host, through each node's UDP forward: the ADD goes to the
//! primary, then every server (the primary too) is asked for the name until
//! it answers authoritatively with the address; then the REMOVE, and every
//! server is asked until it answers without it. Times are counted from the
//! update's response, so they measure NOTIFY and zone transfer, not the
//! driver. The record is removed whatever propagation did, so a failure
//! does not leave it in the zone; the ADD deletes any leftover first.

use super::dns::{self, Answer};
use super::procedure::Procedure;
use super::{Check, Ctx, Verdict, require_forward};
use crate::provision::dns::{TSIG_KEY, TSIG_SECRET_FILE};
use crate::spec::{Cluster, Proto, Role};
use anyhow::{Context, Result, bail};
use base64::Engine;
use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `dns_update`: add an A record through a signed update to the primary,
/// see it on every server, remove it, see it gone everywhere.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsUpdate {
    /// Default: the first control node. Filled by `bind`.
    primary: Option<String>,
    /// Node names or `role:<role>`; default: every control node but the
    /// primary. Expanded (without the primary) by `bind`.
    secondaries: Option<Nodes>,
    /// A label: the name updated is `<record>.<domain>.`.
    record: String,
    address: Ipv4Addr,
    ttl: u32,
    forward: String,
    /// `false` sends the updates unsigned, which bind must refuse.
    sign: bool,
    /// The cluster's domain, the zone updated; filled by `bind`.
    #[serde(skip)]
    zone: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Nodes {
    One(String),
    Many(Vec<String>),
}

impl Default for DnsUpdate {
    fn default() -> Self {
        DnsUpdate {
            primary: None,
            secondaries: None,
            record: "photon-workload".into(),
            address: Ipv4Addr::new(10, 77, 0, 99),
            ttl: 60,
            forward: "dns".into(),
            sign: true,
            zone: String::new(),
        }
    }
}

impl Check for DnsUpdate {
    fn bind(&mut self, _target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        let mut control = cluster.with_role(Role::Control).map(|n| n.name.clone());
        let primary = match self.primary.clone() {
            Some(p) if cluster.node(&p).is_none() => {
                return Err(format!("primary {p:?} is not a node of the cluster"));
            }
            Some(p) => p,
            None => control
                .next()
                .ok_or("the cluster has no control node; set primary")?,
        };
        let secondaries: Vec<String> = match &self.secondaries {
            None => Ok(control.collect()),
            Some(Nodes::One(s)) => cluster.select(std::slice::from_ref(s)),
            Some(Nodes::Many(s)) => cluster.select(s),
        }
        .map_err(|e| format!("secondaries: {e}"))?;
        let secondaries: Vec<String> = secondaries.into_iter().filter(|s| *s != primary).collect();
        for node in std::iter::once(&primary).chain(&secondaries) {
            require_forward(Some(node), cluster, &self.forward, Proto::Udp)?;
        }
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !label_ok(&self.record) {
            return Err(format!(
                "record {:?} is not a DNS label (1-63 letters, digits and inner hyphens)",
                self.record
            ));
        }
        self.zone = cluster.network.domain.clone();
        Name::from_ascii(format!("{}.{}.", self.record, self.zone))
            .map_err(|e| format!("{}.{}: {e}", self.record, self.zone))?;
        self.primary = Some(primary);
        self.secondaries = Some(Nodes::Many(secondaries));
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let (Some(primary), Some(Nodes::Many(secondaries))) = (&self.primary, &self.secondaries)
        else {
            bail!("dns_update was not bound to the cluster");
        };
        let signer = match self.sign {
            true => Some(signer(&read_secret(ctx)?)?),
            false => None,
        };
        let mut servers = Vec::new();
        for node in std::iter::once(primary).chain(secondaries) {
            servers.push((node.clone(), ctx.forward(node, &self.forward)?.host));
        }
        let up = Update {
            zone: Name::from_ascii(format!("{}.", self.zone))?,
            name: Name::from_ascii(format!("{}.{}.", self.record, self.zone))?,
            port: servers[0].1,
            signer,
        };
        let evidence = json!({
            "zone": up.zone.to_string(), "name": up.name.to_string(),
            "address": self.address.to_string(), "primary": primary,
            "secondaries": secondaries, "signed": self.sign,
        });
        Ok(Procedure::on_host(ctx, budget).conclude(
            |run| self.lifecycle(run, &up, &servers),
            // Whatever propagation did, the record leaves the zone (the
            // primary may have applied an add it did not answer).
            |run| {
                up.send(run, "teardown", "remove the record", None)
                    .map(drop)
            },
            evidence,
        ))
    }
}

/// The updates of one check: to the zone, of the name, through the
/// primary's forward, signed or not.
struct Update {
    zone: Name,
    name: Name,
    port: u16,
    signer: Option<TSigner>,
}

impl Update {
    /// Sends the add (`Some(record)`) or the removal as a host step; its
    /// exchange is kept as `evidence[key]` when the step has one.
    fn send(
        &self,
        run: &mut Procedure,
        id: &str,
        label: &str,
        add: Option<(Ipv4Addr, u32)>,
    ) -> Result<String> {
        let (msg, what) = match add {
            Some((a, ttl)) => (
                add_message(&self.zone, &self.name, a, ttl),
                format!("UPDATE {}: add {} A {a}", self.zone, self.name),
            ),
            None => (
                delete_message(&self.zone, &self.name),
                format!("UPDATE {}: delete {} A", self.zone, self.name),
            ),
        };
        let timeout = run
            .deadline()
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut exchange = Value::Null;
        let said = run.host(id, label, &what, || {
            let (ev, outcome) = update(self.port, msg, self.signer.as_ref(), timeout)
                .map_err(|e| format!("{e:#}"))?;
            exchange = ev;
            outcome.map(|()| "NOERROR".to_string())
        });
        if !exchange.is_null() && id != "teardown" {
            run.note(id, exchange);
        }
        said
    }
}

impl DnsUpdate {
    /// Added on the primary, seen on every server, removed, gone from every
    /// server. Times count from each update's answer, so they measure
    /// NOTIFY and zone transfer, not the driver.
    fn lifecycle(
        &self,
        run: &mut Procedure,
        up: &Update,
        servers: &[(String, u16)],
    ) -> Result<String> {
        let primary = &servers[0].0;
        let address = self.address.to_string();
        up.send(
            run,
            "add",
            &format!("{primary}: the add"),
            Some((self.address, self.ttl)),
        )?;
        let since = Instant::now();
        // Half of what is left, so the removal has its share.
        let until = since + run.deadline().saturating_duration_since(since) / 2;
        let has = |a: &Answer| a.authoritative && a.answers.contains(&address);
        let mut seen = Value::Null;
        let arrived = run.host(
            "propagation",
            "the record on every server",
            "ask every server",
            || {
                let late;
                (seen, late) = watch(servers, &up.name, &up.zone, since, until, has);
                let s = (until - since).as_secs_f64();
                late.map_or(Ok("every server answers".into()), |(node, last)| {
                    Err(format!(
                        "{node} does not answer {address} after {s:.0} s (last: {last})"
                    ))
                })
            },
        );
        run.note("propagation", seen);
        // Removed whether or not it arrived everywhere.
        let removed = up.send(run, "remove", &format!("{primary}: the remove"), None);
        arrived?;
        removed?;
        let since = Instant::now();
        let until = run.deadline();
        let gone = |a: &Answer| {
            a.authoritative
                && a.answers.is_empty()
                && matches!(a.rcode, ResponseCode::NoError | ResponseCode::NXDomain)
        };
        let mut seen = Value::Null;
        let dropped = run.host(
            "removal-propagation",
            "the record gone from every server",
            "ask every server",
            || {
                let late;
                (seen, late) = watch(servers, &up.name, &up.zone, since, until, gone);
                let s = until.saturating_duration_since(since).as_secs_f64();
                late.map_or(Ok("every server dropped it".into()), |(node, last)| {
                    Err(match last.contains(&address) {
                        true => format!("{node} still answers {address} after {s:.0} s"),
                        false => format!(
                            "{node} has not dropped {address} after {s:.0} s (last: {last})"
                        ),
                    })
                })
            },
        );
        run.note("removal_propagation", seen);
        dropped?;
        Ok(format!(
            "{} A {address} added on {primary}, seen and then gone on {} servers",
            up.name,
            servers.len()
        ))
    }
}

/// The secret's text, from `<state>/ssh/` (beside the cluster's SSH key).
fn read_secret(ctx: &Ctx) -> Result<String> {
    let dir = ctx
        .record
        .ssh_key
        .parent()
        .context("the SSH key has no directory")?;
    let file = dir.join(TSIG_SECRET_FILE);
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text.trim().to_string())
}

/// The key's bytes: bind is given the secret's hex digits as the key's
/// base64 text, so the key is their base64 decoding (24 bytes for 32).
fn tsig_key(secret: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim())
        .context("the TSIG secret is not base64 text")
}

fn signer(secret: &str) -> Result<TSigner> {
    // A fudge of 300 s, bind's own, for guest clocks a little off.
    TSigner::new(
        tsig_key(secret)?,
        TsigAlgorithm::HmacSha256,
        Name::from_ascii(TSIG_KEY)?,
        300,
    )
    .context("TSIG signer")
}

/// An UPDATE of `zone` (the zone section is its SOA) with `updates`.
fn update_message(zone: &Name, updates: Vec<Record>) -> Message {
    let mut msg = Message::new();
    msg.set_id(fastrand::u16(..))
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Update);
    msg.add_zone(Query::query(zone.clone(), RecordType::SOA));
    msg.add_updates(updates);
    msg
}

/// RFC 2136 2.5.2, delete an RRset: class ANY, TTL 0, no data.
fn delete_rrset(name: &Name) -> Record {
    let mut r = Record::update0(name.clone(), 0, RecordType::A);
    r.set_dns_class(DNSClass::ANY);
    r
}

/// Deletes whatever A rrset a failed run left, then adds the one record
/// (updates apply in order, in one transaction).
fn add_message(zone: &Name, name: &Name, address: Ipv4Addr, ttl: u32) -> Message {
    let add = Record::from_rdata(name.clone(), ttl, RData::A(A(address)));
    update_message(zone, vec![delete_rrset(name), add])
}

fn delete_message(zone: &Name, name: &Name) -> Message {
    update_message(zone, vec![delete_rrset(name)])
}

/// Like `REFUSED`, as bind and dig name them.
fn rcode_name(rcode: ResponseCode) -> String {
    format!("{rcode:?}").to_uppercase()
}

/// Sends one update to the primary: its evidence, and `Err(why)` unless it
/// was answered NOERROR (with a TSIG that verifies, when signed).
fn update(
    port: u16,
    mut msg: Message,
    signer: Option<&TSigner>,
    timeout: Duration,
) -> Result<(Value, Result<(), String>)> {
    let updates: Vec<String> = msg.name_servers().iter().map(|r| r.to_string()).collect();
    let mut ev = json!({ "request": {
        "id": msg.id(), "zone": msg.queries()[0].name().to_string(), "updates": updates,
        "tsig": signer.map(|s| format!("{} {}", s.signer_name(), s.algorithm())),
    }});
    let verifier = match signer {
        Some(s) => msg.finalize(
            s,
            SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as u32,
        )?,
        None => None,
    };
    let bytes = match dns::exchange(port, &msg.to_vec()?, msg.id(), timeout) {
        Ok(b) => b,
        Err(e) => return Ok((ev, Err(format!("got no answer ({e:#})")))),
    };
    let resp = Message::from_vec(&bytes).context("decoding the update's response")?;
    // The verifier checks the response's MAC, which covers the request's
    // MAC, and that its time is within the fudge of ours.
    let tsig = verifier.map(|mut v| v(&bytes).map(drop).map_err(|e| e.to_string()));
    ev["response"] = json!({
        "id": resp.id(), "rcode": rcode_name(resp.response_code()),
        "tsig": match &tsig {
            None => "none asked for".to_string(),
            Some(Ok(())) => "verified".to_string(),
            Some(Err(e)) => format!("does not verify: {e}"),
        },
    });
    let outcome = match (resp.response_code(), tsig) {
        (ResponseCode::NoError, Some(Err(e))) => {
            Err(format!("was answered with no valid TSIG ({e})"))
        }
        (ResponseCode::NoError, _) => Ok(()),
        (rcode, _) => Err(format!("was refused: {}", rcode_name(rcode))),
    };
    Ok((ev, outcome))
}

/// Asks every server for `name` A until `held` holds for its answer or
/// `until` passes: evidence per server (ms since `since`), and the first
/// server that never held with what it said last.
fn watch(
    servers: &[(String, u16)],
    name: &Name,
    zone: &Name,
    since: Instant,
    until: Instant,
    held: impl Fn(&Answer) -> bool + Sync,
) -> (Value, Option<(String, String)>) {
    use crate::wait::{Pause, Probe, Wait};
    let poll = |(node, port): &(String, u16)| {
        let mut last = json!({ "said": "nothing" });
        let got = Wait::new(format!("{node} answers"), Duration::ZERO)
            .until(until)
            .pause(Pause::Every(Duration::from_millis(100)))
            .run(|| {
                Ok(match dns::ask(*port, name, RecordType::A, SECOND) {
                    Ok(a) if held(&a) => Probe::Done((since.elapsed(), a)),
                    Ok(a) => {
                        last = seen(&a, None);
                        Probe::Pending(last["said"].to_string())
                    }
                    Err(e) => {
                        last = json!({ "said": format!("{e:#}") });
                        Probe::Pending(last["said"].to_string())
                    }
                })
            });
        match got {
            Ok((after, a)) => {
                let soa = dns::ask(*port, zone, RecordType::SOA, SECOND);
                let serial = soa.ok().and_then(|s| s.serial);
                let mut ev = seen(&a, serial);
                ev["ms"] = json!(after.as_millis() as u64);
                (node.clone(), ev, true)
            }
            Err(_) => {
                last["ms"] = Value::Null;
                (node.clone(), last, false)
            }
        }
    };
    // Every server at once, so a slow one does not delay noticing the others.
    let results: Vec<(String, Value, bool)> = std::thread::scope(|s| {
        let poll = &poll;
        let handles: Vec<_> = servers
            .iter()
            .map(|srv| s.spawn(move || poll(srv)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("poll thread"))
            .collect()
    });
    let late = results.iter().find(|r| !r.2);
    let late = late.map(|(n, v, _)| (n.clone(), v["said"].as_str().unwrap_or("").to_string()));
    let map: BTreeMap<String, Value> = results.into_iter().map(|(n, v, _)| (n, v)).collect();
    (json!(map), late)
}

const SECOND: Duration = Duration::from_secs(1);

/// One server's answer for the evidence; `said` as in messages, like
/// `NOERROR AA ["10.77.0.99"]`.
fn seen(a: &Answer, serial: Option<u32>) -> Value {
    let aa = if a.authoritative { " AA" } else { "" };
    let said = format!("{}{aa} {:?}", rcode_name(a.rcode), a.answers);
    json!({
        "answers": a.answers, "rcode": rcode_name(a.rcode), "authoritative": a.authoritative,
        "serial": serial.or(a.serial), "said": said,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::dnssec::rdata::DNSSECRData;
    use hickory_proto::dnssec::rdata::tsig::{TSIG, make_tsig_record, message_tbs};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const OTHER: &str = "fedcba9876543210fedcba9876543210";

    fn names() -> (Name, Name) {
        let zone = Name::from_ascii("photon.test.").unwrap();
        (
            zone,
            Name::from_ascii("workload-demo.photon.test.").unwrap(),
        )
    }

    fn tsig_of(msg: &Message) -> (Name, TSIG) {
        let [r] = msg.signature() else {
            panic!("one TSIG record")
        };
        let RData::DNSSEC(DNSSECRData::TSIG(t)) = r.data() else {
            panic!("{r}")
        };
        (r.name().clone(), t.clone())
    }

    #[test]
    fn the_add_replaces_the_rrset_and_the_remove_deletes_it() {
        let (zone, name) = names();
        let add = add_message(&zone, &name, Ipv4Addr::new(10, 77, 0, 99), 60);
        assert_eq!(add.op_code(), OpCode::Update);
        let [z] = add.queries() else {
            panic!("one zone")
        };
        assert_eq!(
            (z.name(), z.query_type(), z.query_class()),
            (&zone, RecordType::SOA, DNSClass::IN)
        );
        let [gone, new] = add.name_servers() else {
            panic!("two updates")
        };
        assert_eq!(
            (gone.dns_class(), gone.record_type(), gone.ttl()),
            (DNSClass::ANY, RecordType::A, 0)
        );
        assert_eq!(gone.data(), &RData::Update0(RecordType::A));
        assert_eq!(
            (new.name(), new.dns_class(), new.ttl()),
            (&name, DNSClass::IN, 60)
        );
        assert_eq!(new.data(), &RData::A(A::new(10, 77, 0, 99)));
        let del = delete_message(&zone, &name);
        assert_eq!(del.name_servers(), std::slice::from_ref(gone));
        // On the wire as bind reads it: RDLENGTH 0.
        let back = Message::from_vec(&del.to_vec().unwrap()).unwrap();
        assert_eq!(
            back.name_servers()[0].data(),
            &RData::Update0(RecordType::A)
        );
        assert_eq!(back.name_servers(), del.name_servers());
    }

    #[test]
    fn the_key_is_the_hex_secret_read_as_base64() {
        let key = tsig_key(&format!("{SECRET}\n")).unwrap();
        assert_eq!(key.len(), 24);
        assert_eq!(&key[..3], &[0xd3, 0x5d, 0xb7]);
        assert!(tsig_key("0123456789abcdef0").is_err());
    }

    #[test]
    fn a_signed_update_carries_a_tsig_that_only_the_key_verifies() {
        let (zone, name) = names();
        let mut msg = delete_message(&zone, &name);
        let now = 1_700_000_000;
        let mut verify = msg
            .finalize(&signer(SECRET).unwrap(), now)
            .unwrap()
            .unwrap();
        let (key_name, tsig) = tsig_of(&msg);
        assert_eq!(key_name, Name::from_ascii("photon-update.").unwrap());
        assert_eq!(tsig.algorithm(), &TsigAlgorithm::HmacSha256);
        let verifies = |secret: &str, previous: Option<&[u8]>, bytes: &[u8]| {
            let s = signer(secret).unwrap();
            s.verify_message_byte(previous, bytes, true).is_ok()
        };
        let bytes = msg.to_vec().unwrap();
        assert!(verifies(SECRET, None, &bytes) && !verifies(OTHER, None, &bytes));

        // bind's response: its MAC covers the request's (RFC 8945 5.3).
        let response = |secret: &str| {
            let s = signer(secret).unwrap();
            let mut resp = Message::new();
            resp.set_id(msg.id())
                .set_message_type(MessageType::Response)
                .set_op_code(OpCode::Update);
            let pre = TSIG::new(
                TsigAlgorithm::HmacSha256,
                now.into(),
                300,
                vec![],
                msg.id(),
                0,
                vec![],
            );
            let tbs = message_tbs(Some(tsig.mac()), &resp, &pre, s.signer_name()).unwrap();
            let mac = s.sign(&tbs).unwrap();
            resp.add_tsig(make_tsig_record(s.signer_name().clone(), pre.set_mac(mac)));
            resp.to_vec().unwrap()
        };
        assert!(!verifies(SECRET, Some(tsig.mac()), &response(OTHER)));
        assert!(verify(&response(SECRET)).is_ok());
    }

    fn bound(table: &str) -> Result<DnsUpdate, String> {
        let mut c: DnsUpdate = toml::from_str(table).map_err(|e| e.to_string())?;
        c.bind(None, &Cluster::profile("reference").unwrap())
            .map(|()| c)
    }

    #[test]
    fn bind_refuses_unknown_nodes_nodes_without_the_forward_and_bad_labels() {
        let c = bound("").unwrap();
        assert_eq!(c.primary.as_deref(), Some("node01"));
        let Some(Nodes::Many(s)) = &c.secondaries else {
            panic!()
        };
        assert_eq!(
            (s, c.zone.as_str()),
            (&vec!["node02".to_string(), "node03".into()], "photon.test")
        );
        let c = bound("primary = \"node02\"\nsecondaries = \"role:control\"").unwrap();
        assert!(matches!(&c.secondaries, Some(Nodes::Many(s)) if s == &["node01", "node03"]));
        let e = bound("primary = \"node09\"").unwrap_err();
        assert!(e.contains("\"node09\" is not a node"), "{e}");
        let e = bound("secondaries = [\"node02\", \"node19\"]").unwrap_err();
        assert!(e.contains("secondaries") && e.contains("node19"), "{e}");
        let e = bound("secondaries = [\"node04\"]").unwrap_err();
        assert!(e.contains("node04 has no udp forward"), "{e}");
        for bad in ["", "-x", "a.b", "under_score", &"x".repeat(64)] {
            let e = bound(&format!("record = {bad:?}")).unwrap_err();
            assert!(e.contains("not a DNS label"), "{e}");
        }
    }
}
