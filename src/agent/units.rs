//! The agent's `units` request: expected systemd units watched from inside
//! the guest, answered the moment all are active or one failed.
//!
//! systemd tells us each change itself: the agent subscribes to systemd's
//! signals on the system bus and reads the `PropertiesChanged` signals of
//! the units it watches. No process is spawned per look and nothing polls,
//! so the answer leaves the guest within milliseconds of the change (a
//! `systemctl is-active` loop every 100 ms cost a spawn per look and up to
//! its period late).
//!
//! Why the system bus and not PID 1's own socket (`/run/systemd/private`,
//! there earlier in boot): on that socket systemd signs its messages with
//! its well-known name, and zbus (rightly, by the D-Bus specification)
//! refuses a sender that is no unique name ("Invalid unique name"). Early
//! in boot the watch first waits for the system bus's socket; a guest
//! without one (no dbus) fails the request, and the driver watches with
//! systemctl instead (`guest/ready.rs`).
//!
//! The D-Bus protocol is zbus's (a pure-Rust client), not written here.

use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use zbus::{OwnedObjectPath, OwnedVariant};

/// The signals the watch reads (filtered to its units' paths below).
const CHANGES: &str =
    "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'";
const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// One observed change: the unit, its new ActiveState, when the agent saw
/// it on the guest's monotonic clock, and systemd's own moment of entering
/// active (ActiveEnterTimestampMonotonic, which the same signal carries).
struct Change {
    unit: String,
    state: String,
    at: f64,
    active_since: Option<f64>,
}

/// Watches `units` for at most `within`: the answer is
/// `{"states": {UNIT: STATE}, "changes": [{"unit", "state", "monotonic"}],
/// "active_since": {UNIT: SECS}, "monotonic"}`, given as soon as every unit
/// is active or one failed, else when `within` ran out (the states then say
/// what is still waited for).
pub fn watch(units: &[String], within: Duration, now: fn() -> f64) -> Result<Value, String> {
    // The watch itself ends at `within`. It runs on a thread of its own, so
    // that what it cannot bound (a bus daemon slow to accept, a call never
    // answered, anything that blocks the runtime) is given up a little
    // later, well before the driver gives up the answer (10 s after
    // `within`, `guest/channel.rs`) and breaks the channel. A watch given
    // up ends on its own once the bus answers or closes.
    let (tx, rx) = std::sync::mpsc::channel();
    let units = units.to_vec();
    std::thread::spawn(move || drop(tx.send(watch_on_runtime(&units, within, now))));
    rx.recv_timeout(within + LATE).unwrap_or_else(|_| {
        Err(format!(
            "watching systemd on the system bus: no answer from the bus within {:.1} s",
            (within + LATE).as_secs_f64()
        ))
    })
}

fn watch_on_runtime(units: &[String], within: Duration, now: fn() -> f64) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime for the watch: {e}"))?;
    rt.block_on(watch_async(units, within, now))
        .map_err(|e| format!("watching systemd on the system bus: {e}"))
}

/// How long past its window a watch may take before it is given up.
const LATE: Duration = Duration::from_secs(1);

async fn watch_async(units: &[String], within: Duration, now: fn() -> f64) -> zbus::Result<Value> {
    let until = tokio::time::Instant::now() + within;
    bus_socket(until).await?;
    let conn = zbus::connection::Builder::system().build().await?;
    // The stream exists before the subscription and before the first
    // look, so that no change between the two is missed.
    let mut signals = zbus::MessageStream::for_match_rule(CHANGES, &conn, None).await?;
    call(&conn, MANAGER_PATH, MANAGER, "Subscribe", &()).await?;
    let mut paths: BTreeMap<String, String> = BTreeMap::new();
    let mut states: BTreeMap<String, String> = BTreeMap::new();
    let mut since: BTreeMap<String, f64> = BTreeMap::new();
    for unit in units {
        let path: OwnedObjectPath = call(&conn, MANAGER_PATH, MANAGER, "LoadUnit", &(unit,))
            .await?
            .body()
            .deserialize()?;
        let state = String::try_from(property(&conn, &path, "ActiveState").await?)?;
        let entered = property(&conn, &path, "ActiveEnterTimestampMonotonic").await?;
        states.insert(unit.clone(), state);
        since.insert(unit.clone(), u64::try_from(entered)? as f64 / 1e6);
        paths.insert(path.as_str().to_string(), unit.clone());
    }
    let mut changes = Vec::new();
    while !settled(&states) {
        let message = match tokio::time::timeout_at(until, signals.next()).await {
            Err(_) => break, // the window ran out; the driver asks again
            Ok(None) => return Err(zbus::Error::Failure("systemd closed the bus".into())),
            Ok(Some(m)) => m?,
        };
        if let Some(change) = active_state_change(&message, &paths, now) {
            states.insert(change.unit.clone(), change.state.clone());
            match change.active_since {
                Some(s) => drop(since.insert(change.unit.clone(), s)),
                // A signal without the moment: asked for once settled.
                None => drop(since.remove(&change.unit)),
            }
            changes.push(change);
        }
    }
    for (path, unit) in &paths {
        if !since.contains_key(unit) {
            let entered = property(&conn, path, "ActiveEnterTimestampMonotonic").await?;
            since.insert(unit.clone(), u64::try_from(entered)? as f64 / 1e6);
        }
    }
    let changes: Vec<Value> = changes
        .iter()
        .map(|c| json!({"unit": c.unit, "state": c.state, "monotonic": c.at}))
        .collect();
    Ok(json!({"states": states, "changes": changes, "active_since": since, "monotonic": now()}))
}

/// One property of the unit at `path`.
async fn property(conn: &zbus::Connection, path: &str, name: &str) -> zbus::Result<OwnedVariant> {
    call(conn, path, PROPERTIES, "Get", &(UNIT, name))
        .await?
        .body()
        .deserialize()
}

/// The system bus's socket (dbus.socket, part of sockets.target).
const BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

/// Waits until the system bus's socket exists, at most until `until`: early
/// in boot a node is asked before sockets.target, and its units become
/// active only after. A look every 20 ms is one stat, no process.
async fn bus_socket(until: tokio::time::Instant) -> zbus::Result<()> {
    while !std::path::Path::new(BUS_SOCKET).exists() {
        if tokio::time::Instant::now() >= until {
            return Err(zbus::Error::Failure(format!("{BUS_SOCKET} never appeared")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// All active, or one failed: the answer can go.
fn settled(states: &BTreeMap<String, String>) -> bool {
    states.values().all(|s| s == "active") || states.values().any(|s| s == "failed")
}

async fn call<B>(
    conn: &zbus::Connection,
    path: &str,
    interface: &str,
    method: &str,
    body: &B,
) -> zbus::Result<zbus::Message>
where
    B: serde::Serialize + zbus::DynamicType,
{
    conn.call_method(Some(SYSTEMD), path, Some(interface), method, body)
        .await
}

/// A watched unit's new ActiveState, if `message` is the signal that says so.
fn active_state_change(
    message: &zbus::Message,
    paths: &BTreeMap<String, String>,
    now: fn() -> f64,
) -> Option<Change> {
    let header = message.header();
    if header.member()?.as_str() != "PropertiesChanged" {
        return None;
    }
    let unit = paths.get(header.path()?.as_str())?;
    let (interface, changed, _): (String, BTreeMap<String, OwnedVariant>, Vec<String>) =
        message.body().deserialize().ok()?;
    if interface != UNIT {
        return None;
    }
    let state = String::try_from(changed.get("ActiveState")?.try_clone().ok()?).ok()?;
    let active_since = changed
        .get("ActiveEnterTimestampMonotonic")
        .and_then(|v| u64::try_from(v.try_clone().ok()?).ok())
        .map(|us| us as f64 / 1e6);
    Some(Change {
        unit: unit.clone(),
        state,
        at: now(),
        active_since,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_ends_when_all_are_active_or_one_failed() {
        let s = |v: &[&str]| -> BTreeMap<String, String> {
            v.iter()
                .enumerate()
                .map(|(i, s)| (format!("u{i}"), s.to_string()))
                .collect()
        };
        assert!(settled(&s(&["active", "active"])));
        assert!(settled(&s(&["activating", "failed"])));
        assert!(!settled(&s(&["active", "activating"])));
        assert!(!settled(&s(&["inactive"])));
    }
}
