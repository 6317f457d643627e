//! A workload's history, Jepsen-style: every write a client attempted, with
//! what it learned (acknowledged, refused, or indeterminate), and the check
//! afterwards that no acknowledged write is missing from any member.
//!
//! Refused writes were definitely not applied (the server said so before
//! proposing them); indeterminate ones (timeouts, a connection cut mid-way)
//! may or may not have been, so neither their presence nor their absence
//! is an error.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    Acknowledged,
    Refused,
    Indeterminate,
}

/// One operation, as one line of the history artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    pub seq: u64,
    pub key: String,
    /// The member the client sent the write to.
    pub member: String,
    /// Milliseconds from the start of the scenario.
    pub start_ms: u64,
    pub end_ms: u64,
    pub result: Ack,
    /// What was going on at the time (`healthy`, `partition`, ...).
    pub phase: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The verdict over a history and what each member holds at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Tally {
    pub acknowledged: usize,
    pub refused: usize,
    pub indeterminate: usize,
    /// Acknowledged writes missing on at least one member.
    pub lost: usize,
    /// Per member: the acknowledged keys it does not hold (first 20).
    pub missing: BTreeMap<String, Vec<String>>,
    /// Refused writes that are present anyway (a server that lied).
    pub refused_but_present: Vec<String>,
}

impl Tally {
    pub fn of(ops: &[Op], held: &BTreeMap<String, BTreeSet<String>>) -> Tally {
        let count = |a: Ack| ops.iter().filter(|o| o.result == a).count();
        let acked: Vec<&str> = ops
            .iter()
            .filter(|o| o.result == Ack::Acknowledged)
            .map(|o| o.key.as_str())
            .collect();
        let mut lost = BTreeSet::new();
        let mut missing = BTreeMap::new();
        for (member, keys) in held {
            let gone: Vec<String> = acked
                .iter()
                .filter(|k| !keys.contains(**k))
                .map(|k| k.to_string())
                .collect();
            lost.extend(gone.iter().cloned());
            if !gone.is_empty() {
                missing.insert(member.clone(), gone.into_iter().take(20).collect());
            }
        }
        let refused_but_present = ops
            .iter()
            .filter(|o| o.result == Ack::Refused)
            .filter(|o| held.values().any(|k| k.contains(&o.key)))
            .map(|o| o.key.clone())
            .collect();
        Tally {
            acknowledged: count(Ack::Acknowledged),
            refused: count(Ack::Refused),
            indeterminate: count(Ack::Indeterminate),
            lost: lost.len(),
            missing,
            refused_but_present,
        }
    }

    /// No acknowledged write lost, and no refused write applied.
    pub fn safe(&self) -> bool {
        self.lost == 0 && self.refused_but_present.is_empty()
    }
}

/// The acknowledged keys of `ops` that `keys` does not hold.
pub fn absent<'a>(ops: &'a [Op], keys: &BTreeSet<String>) -> Vec<&'a str> {
    ops.iter()
        .filter(|o| o.result == Ack::Acknowledged && !keys.contains(&o.key))
        .map(|o| o.key.as_str())
        .collect()
}

/// The history as JSON lines, one operation each.
pub fn to_jsonl(ops: &[Op]) -> String {
    ops.iter()
        .filter_map(|o| serde_json::to_string(o).ok())
        .map(|l| l + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(seq: u64, result: Ack) -> Op {
        Op {
            seq,
            key: format!("k{seq}"),
            member: "node01".into(),
            start_ms: seq * 10,
            end_ms: seq * 10 + 5,
            result,
            phase: "healthy".into(),
            error: String::new(),
        }
    }

    fn held(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn every_acknowledged_write_on_every_member_is_safe() {
        let ops = [
            op(1, Ack::Acknowledged),
            op(2, Ack::Indeterminate),
            op(3, Ack::Refused),
        ];
        let members = BTreeMap::from([
            ("a".to_string(), held(&["k1", "k2"])),
            ("b".to_string(), held(&["k1"])),
        ]);
        let t = Tally::of(&ops, &members);
        assert_eq!((t.acknowledged, t.indeterminate, t.refused), (1, 1, 1));
        assert_eq!(t.lost, 0);
        assert!(t.safe(), "an indeterminate write may be present or not");
    }

    #[test]
    fn a_member_missing_an_acknowledged_write_is_named_with_the_key() {
        let ops = [op(1, Ack::Acknowledged), op(2, Ack::Acknowledged)];
        let members = BTreeMap::from([
            ("a".to_string(), held(&["k1", "k2"])),
            ("b".to_string(), held(&["k1"])),
        ]);
        let t = Tally::of(&ops, &members);
        assert_eq!(t.lost, 1);
        assert_eq!(t.missing["b"], ["k2"]);
        assert!(!t.safe());
        assert_eq!(absent(&ops, &members["b"]), ["k2"]);
    }

    #[test]
    fn a_refused_write_that_shows_up_is_not_safe() {
        let ops = [op(1, Ack::Refused)];
        let members = BTreeMap::from([("a".to_string(), held(&["k1"]))]);
        let t = Tally::of(&ops, &members);
        assert_eq!(t.refused_but_present, ["k1"]);
        assert!(!t.safe());
    }

    #[test]
    fn the_history_is_one_json_line_per_operation() {
        let text = to_jsonl(&[op(1, Ack::Acknowledged), op(2, Ack::Refused)]);
        assert_eq!(text.lines().count(), 2);
        let back: Op = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(back.result, Ack::Refused);
    }
}
