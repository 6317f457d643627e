//! The agent's `units` request: expected systemd units watched from inside
//! the guest, answered the moment all are active or one failed.
//!
//! systemd tells us each change itself: one watcher per agent, on a thread
//! of its own, stays subscribed to systemd's signals on the system bus and
//! keeps the state of every unit it was ever asked about, fed by the
//! `PropertiesChanged` signals of those units. A request reads that cache
//! and waits on it; nothing polls and no process is spawned.
//!
//! Why one long-lived watcher, not a connection per request: after a
//! snapshot restore, under TCG, a new connection (its handshake with
//! dbus-daemon, the subscription, a LoadUnit and two Gets per unit, through
//! code the emulator had to translate again) took 0.43-0.50 s of a 0.8 s
//! one-node restore; the watcher, restored with the guest, is already
//! connected and knows the answer. It also sees changes between requests.
//!
//! Why the system bus and not PID 1's own socket (`/run/systemd/private`,
//! there earlier in boot): on that socket systemd signs its messages with
//! its well-known name, and zbus (rightly, by the D-Bus specification)
//! refuses a sender that is no unique name ("Invalid unique name"). Early
//! in boot the watcher first waits for the system bus's socket; a guest
//! without one (no dbus) fails the request at its deadline, and the driver
//! watches with systemctl instead (`guest/ready.rs`).
//!
//! The D-Bus protocol is zbus's (a pure-Rust client), not written here.

use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use zbus::{OwnedObjectPath, OwnedVariant};

/// The signals the watcher reads (filtered to its units' paths below).
const CHANGES: &str =
    "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'";
const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
/// The system bus's socket (dbus.socket, part of sockets.target).
const BUS_SOCKET: &str = "/run/dbus/system_bus_socket";
/// The changes kept for requests to report (the newest).
const KEPT_CHANGES: usize = 256;

/// One observed change: the unit, its new ActiveState, and when the
/// watcher saw it on the guest's monotonic clock.
#[derive(Clone)]
struct Change {
    seq: u64,
    unit: String,
    state: String,
    at: f64,
}

/// A unit as the watcher knows it: its ActiveState and systemd's own
/// moment of entering active (ActiveEnterTimestampMonotonic, seconds).
#[derive(Clone)]
struct UnitState {
    state: String,
    since: f64,
}

/// What the watcher knows, shared with the requests.
#[derive(Default)]
struct Known {
    /// Subscribed on the bus now; the cache is current.
    connected: bool,
    /// Why the last connection failed, for a request that times out.
    trouble: Option<String>,
    units: HashMap<String, UnitState>,
    /// Names systemd would not load (not a unit name), with its reason.
    refused: HashMap<String, String>,
    changes: Vec<Change>,
    next_seq: u64,
}

struct Watcher {
    known: Mutex<Known>,
    changed: Condvar,
    /// Names a request asked about, for the watcher to load and follow.
    asks: UnboundedSender<String>,
}

impl Watcher {
    fn lock(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Known)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// The agent's one watcher, started by the first request.
fn watcher(now: fn() -> f64) -> &'static Watcher {
    static WATCHER: OnceLock<Watcher> = OnceLock::new();
    WATCHER.get_or_init(|| {
        let (asks, asked) = unbounded_channel();
        std::thread::spawn(move || follow(asked, now));
        Watcher {
            known: Mutex::default(),
            changed: Condvar::new(),
            asks,
        }
    })
}

/// Watches `units` for at most `within`: the answer is
/// `{"states": {UNIT: STATE}, "changes": [{"unit", "state", "monotonic"}],
/// "active_since": {UNIT: SECS}, "monotonic"}`, given as soon as every unit
/// is active or one failed, else when `within` ran out (the states then say
/// what is still waited for). `changes`: those seen during the request.
pub fn watch(units: &[String], within: Duration, now: fn() -> f64) -> Result<Value, String> {
    let until = Instant::now() + within;
    let w = watcher(now);
    for unit in units {
        // The watcher's thread outlives every request.
        let _ = w.asks.send(unit.clone());
    }
    let mut known = w.lock();
    let first = known.next_seq;
    let refused = |k: &Known| {
        units
            .iter()
            .find_map(|u| Some((u, k.refused.get(u)?.clone())))
    };
    let answered = |k: &Known| {
        k.connected && units.iter().all(|u| k.units.contains_key(u)) && settled(k, units)
            || refused(k).is_some()
    };
    while !answered(&known) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        known = w
            .changed
            .wait_timeout(known, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    if let Some((unit, why)) = refused(&known) {
        return Err(format!("systemd cannot load {unit:?}: {why}"));
    }
    if !known.connected {
        return Err(format!(
            "watching systemd on the system bus: not connected within {:.1} s{}",
            within.as_secs_f64(),
            known
                .trouble
                .as_ref()
                .map(|t| format!(" ({t})"))
                .unwrap_or_default()
        ));
    }
    let state = |u: &String| known.units.get(u).map(|s| s.state.clone());
    let states: BTreeMap<&String, String> = units
        .iter()
        .map(|u| (u, state(u).unwrap_or_else(|| "unknown".into())))
        .collect();
    let since: BTreeMap<&String, f64> = units
        .iter()
        .filter_map(|u| Some((u, known.units.get(u)?.since)))
        .collect();
    let changes: Vec<Value> = known
        .changes
        .iter()
        .filter(|c| c.seq >= first && units.contains(&c.unit))
        .map(|c| json!({"unit": c.unit, "state": c.state, "monotonic": c.at}))
        .collect();
    Ok(json!({"states": states, "changes": changes, "active_since": since, "monotonic": now()}))
}

/// All active, or one failed: the answer can go.
fn settled(known: &Known, units: &[String]) -> bool {
    let state = |u: &String| known.units.get(u).map(|s| s.state.as_str());
    units.iter().all(|u| state(u) == Some("active"))
        || units.iter().any(|u| state(u) == Some("failed"))
}

/// The watcher's thread: connects, follows, and connects again if the bus
/// goes away (dbus restarted), for as long as the agent runs.
fn follow(mut asked: UnboundedReceiver<String>, now: fn() -> f64) {
    let w = watcher(now);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        w.update(|k| k.trouble = Some("no runtime for the watch".into()));
        return;
    };
    let mut names: Vec<String> = Vec::new();
    loop {
        let ended = rt.block_on(session(w, &mut asked, &mut names, now));
        w.update(|k| {
            k.connected = false;
            k.units.clear();
            k.trouble = Some(ended.to_string());
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One connection to the bus, until it fails: the names asked before are
/// loaded again, then signals and new names are followed as they come.
async fn session(
    w: &Watcher,
    asked: &mut UnboundedReceiver<String>,
    names: &mut Vec<String>,
    now: fn() -> f64,
) -> zbus::Error {
    let conn = match connect().await {
        Ok(c) => c,
        Err(e) => return e,
    };
    // The stream exists before the subscription and before the first
    // look, so that no change between the two is missed.
    let mut signals = match zbus::MessageStream::for_match_rule(CHANGES, &conn, None).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    if let Err(e) = call(&conn, MANAGER_PATH, MANAGER, "Subscribe", &()).await {
        return e;
    }
    let mut paths: HashMap<String, String> = HashMap::new();
    for name in names.clone() {
        if let Err(e) = load(&conn, w, &mut paths, &name).await {
            return e;
        }
    }
    names.retain(|n| paths.values().any(|p| p == n));
    w.update(|k| k.connected = true);
    loop {
        tokio::select! {
            message = signals.next() => match message {
                None => return zbus::Error::Failure("the bus closed the connection".into()),
                Some(Err(e)) => return e,
                Some(Ok(m)) => {
                    if let Err(e) = take_change(&conn, w, &m, &paths, now).await {
                        return e;
                    }
                }
            },
            Some(name) = asked.recv() => {
                if paths.values().any(|n| *n == name) {
                    continue;
                }
                if let Err(e) = load(&conn, w, &mut paths, &name).await {
                    return e;
                }
                if paths.values().any(|n| *n == name) {
                    names.push(name);
                }
            }
        }
    }
}

/// Connects to the system bus once its socket exists: early in boot a node
/// is asked before sockets.target. A look every 20 ms is one stat.
async fn connect() -> zbus::Result<zbus::Connection> {
    while !std::path::Path::new(BUS_SOCKET).exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    zbus::connection::Builder::system().build().await
}

/// Loads the unit `name` (systemd knows it by path from then on) and
/// records its state, unless a signal already did. A name systemd refuses
/// is recorded as refused (the requests that ask for it fail), and the
/// connection goes on: one bad name must not keep the watcher down.
async fn load(
    conn: &zbus::Connection,
    w: &Watcher,
    paths: &mut HashMap<String, String>,
    name: &str,
) -> zbus::Result<()> {
    let loaded = call(conn, MANAGER_PATH, MANAGER, "LoadUnit", &(name,)).await;
    let path: OwnedObjectPath = match loaded {
        // systemd's error reply (zbus gives the standard names as FDO).
        Err(e @ (zbus::Error::MethodError(..) | zbus::Error::FDO(_))) => {
            w.update(|k| drop(k.refused.insert(name.to_string(), e.to_string())));
            return Ok(());
        }
        other => other?.body().deserialize()?,
    };
    paths.insert(path.as_str().to_string(), name.to_string());
    let state = String::try_from(property(conn, &path, "ActiveState").await?)?;
    let since = active_since(conn, &path).await?;
    w.update(|k| {
        k.units
            .entry(name.to_string())
            .or_insert(UnitState { state, since });
    });
    Ok(())
}

/// Records a watched unit's new ActiveState, if `message` is the signal
/// that says so. A signal without the moment of entering active (systemd
/// sends it with ActiveState, but need not) is followed by a Get.
async fn take_change(
    conn: &zbus::Connection,
    w: &Watcher,
    message: &zbus::Message,
    paths: &HashMap<String, String>,
    now: fn() -> f64,
) -> zbus::Result<()> {
    let header = message.header();
    let Some(path) = header.path() else {
        return Ok(());
    };
    let Some(unit) = paths.get(path.as_str()) else {
        return Ok(());
    };
    let Ok((interface, changed, _)) =
        message
            .body()
            .deserialize::<(String, BTreeMap<String, OwnedVariant>, Vec<String>)>()
    else {
        return Ok(());
    };
    let Some(state) = changed
        .get("ActiveState")
        .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
    else {
        return Ok(());
    };
    if interface != UNIT {
        return Ok(());
    }
    let at = now();
    let since = match changed
        .get("ActiveEnterTimestampMonotonic")
        .and_then(|v| u64::try_from(v.try_clone().ok()?).ok())
    {
        Some(us) => us as f64 / 1e6,
        None => active_since(conn, path.as_str()).await?,
    };
    w.update(|k| {
        let seq = k.next_seq;
        k.next_seq += 1;
        k.changes.push(Change {
            seq,
            unit: unit.clone(),
            state: state.clone(),
            at,
        });
        if k.changes.len() > KEPT_CHANGES {
            k.changes.remove(0);
        }
        k.units.insert(unit.clone(), UnitState { state, since });
    });
    Ok(())
}

async fn active_since(conn: &zbus::Connection, path: &str) -> zbus::Result<f64> {
    let entered = property(conn, path, "ActiveEnterTimestampMonotonic").await?;
    Ok(u64::try_from(entered)? as f64 / 1e6)
}

/// One property of the unit at `path`.
async fn property(conn: &zbus::Connection, path: &str, name: &str) -> zbus::Result<OwnedVariant> {
    call(conn, path, PROPERTIES, "Get", &(UNIT, name))
        .await?
        .body()
        .deserialize()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_ends_when_all_are_active_or_one_failed() {
        let known = |v: &[&str]| -> (Known, Vec<String>) {
            let mut k = Known::default();
            for (i, s) in v.iter().enumerate() {
                let state = UnitState {
                    state: s.to_string(),
                    since: 0.0,
                };
                k.units.insert(format!("u{i}"), state);
            }
            (k, (0..v.len()).map(|i| format!("u{i}")).collect())
        };
        let is_settled = |v: &[&str]| {
            let (k, names) = known(v);
            settled(&k, &names)
        };
        assert!(is_settled(&["active", "active"]));
        assert!(is_settled(&["activating", "failed"]));
        assert!(!is_settled(&["active", "activating"]));
        assert!(!is_settled(&["inactive"]));
        // A unit the watcher has not loaded yet is not active.
        let (k, _) = known(&["active"]);
        assert!(!settled(&k, &["u0".into(), "u1".into()]));
    }
}
