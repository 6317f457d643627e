//! NightLight's write path: a Prometheus remote-write request (protobuf,
//! snappy block compression, as `remote.proto` defines it) from the host
//! through the target's forward, then an instant query for the same series
//! must return the written value.
//!
//! The series carries a fresh `nonce` label, so an earlier run's sample
//! can never satisfy the query; the query is evaluated at the sample's own
//! timestamp, so a guest clock behind the host's does not hide it.

use super::{Check, Ctx, Verdict, require_forward};
use crate::spec::{Cluster, Proto};
use crate::wait::{Pause, Probe, Wait};
use anyhow::Result;
use prost::Message;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `remote_write`: a Prometheus remote-write request (protobuf + snappy)
/// from the host through the target's forward; an instant query must
/// return the sample.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWrite {
    #[serde(default = "prometheus_forward")]
    forward: String,
    #[serde(default = "remote_write_path")]
    path: String,
}

fn prometheus_forward() -> String {
    "prometheus".into()
}
fn remote_write_path() -> String {
    "/api/v1/write".into()
}

impl Check for RemoteWrite {
    fn bind(&mut self, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        require_forward(target, cluster, &self.forward, Proto::Tcp)
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        write_then_query(ctx, ctx.node(target)?, &self.forward, &self.path, budget)
    }
}

/// prometheus/prompb `WriteRequest` (types.proto / remote.proto), the fields a
/// receiver needs; metadata (field 3) is optional.
#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

pub const METRIC: &str = "photon_remote_write_probe";

/// One sample of `METRIC{nonce}`, encoded and compressed as a request body.
pub fn body(nonce: &str, value: f64, timestamp_ms: i64) -> Result<Vec<u8>> {
    let req = WriteRequest {
        timeseries: vec![TimeSeries {
            // Sorted by name, as receivers expect.
            labels: vec![
                Label {
                    name: "__name__".into(),
                    value: METRIC.into(),
                },
                Label {
                    name: "nonce".into(),
                    value: nonce.into(),
                },
            ],
            samples: vec![Sample {
                value,
                timestamp: timestamp_ms,
            }],
        }],
    };
    Ok(snap::raw::Encoder::new().compress_vec(&req.encode_to_vec())?)
}

pub fn write_then_query(
    ctx: &Ctx,
    node: &str,
    forward: &str,
    write_path: &str,
    budget: Duration,
) -> Result<Verdict> {
    let fwd = ctx.forward(node, forward)?;
    let base = format!("http://127.0.0.1:{}", fwd.host);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let nonce = format!("{:x}", now.as_nanos());
    let ts = now.as_millis() as i64;
    let value = (now.subsec_micros() % 100_000) as f64 + 0.5;
    let mut evidence = json!({
        "forward": format!("{node}/{forward} {fwd}"),
        "series": format!("{METRIC}{{nonce=\"{nonce}\"}}"),
        "value": value,
        "timestamp_ms": ts,
    });
    let agent = super::http::host_agent(budget);
    let started = Instant::now();
    let resp = agent
        .post(&format!("{base}{write_path}"))
        .header("Content-Encoding", "snappy")
        .header("Content-Type", "application/x-protobuf")
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .send(&body(&nonce, value, ts)?[..]);
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => return Ok(Verdict::fail(format!("remote write: {e}"), evidence)),
    };
    let status = resp.status().as_u16();
    evidence["write_status"] = json!(status);
    if !(200..300).contains(&status) {
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        evidence["write_body"] = json!(text);
        return Ok(Verdict::fail(
            format!("remote write answered HTTP {status}: {}", text.trim()),
            evidence,
        ));
    }
    // Queryable once the receiver has appended it; usually at once.
    let query = format!("{METRIC}{{nonce=\"{nonce}\"}}");
    let mut last: Option<Value> = None;
    let found = Wait::new("sample queryable", budget)
        .until(started + budget)
        .pause(Pause::Every(Duration::from_millis(500)))
        .run(|| {
            let got = agent
                .get(&format!("{base}/api/v1/query"))
                .query("query", &query)
                .query("time", format!("{:.3}", ts as f64 / 1000.0 + 1.0))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let v = got
                .as_ref()
                .and_then(|g| g.pointer("/data/result/0/value/1"))
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<f64>().ok());
            last = got;
            Ok(match v {
                Some(v) => Probe::Done(v),
                None => Probe::Pending("not in a query yet".into()),
            })
        });
    evidence["query"] = last.unwrap_or_default();
    match found {
        Ok(v) => {
            evidence["queryable_after_s"] = json!(started.elapsed().as_secs_f64());
            Ok(if v == value {
                Verdict::pass(
                    format!(
                        "wrote {query} = {value}, read back in {:.2} s",
                        started.elapsed().as_secs_f64()
                    ),
                    evidence,
                )
            } else {
                Verdict::fail(format!("{query} reads {v}, wrote {value}"), evidence)
            })
        }
        Err(_) => Ok(Verdict::fail(
            format!("the write was accepted (HTTP {status}) but {query} never appeared"),
            evidence,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_decodes_back_to_the_sample() {
        let b = body("abc", 42.5, 1_700_000_000_000).unwrap();
        let raw = snap::raw::Decoder::new().decompress_vec(&b).unwrap();
        let req = WriteRequest::decode(&raw[..]).unwrap();
        let ts = &req.timeseries[0];
        assert_eq!(ts.labels[0].value, METRIC);
        assert_eq!(ts.labels[1].name, "nonce");
        assert_eq!(ts.samples[0].value, 42.5);
        assert_eq!(ts.samples[0].timestamp, 1_700_000_000_000);
    }
}
