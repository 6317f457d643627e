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
//! in boot the watcher first waits for the system bus's socket; a request
//! that finds it still unconnected at the end of its window says so
//! (`"not_connected": true`), and the driver takes the next look with systemctl
//! (`guest/ready.rs`).
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
/// What a `units` answer's error starts with when the watcher had no
/// connection to the bus for the request's whole window. The answer also
/// says `"not_connected": true`, and on that the driver looks with
/// systemctl once and asks the agent again (`guest/ready.rs`).
const NOT_CONNECTED: &str = "watching systemd on the system bus: not connected yet";
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

/// A unit as the watcher knows it: its ActiveState, systemd's own moment
/// of entering active (ActiveEnterTimestampMonotonic, seconds), and the
/// serial of systemd's message that said so. systemd numbers the messages
/// it sends (signals and replies alike) in order, and the bus daemon keeps
/// the numbers: a message with a lower serial is older and changes nothing,
/// in whatever order the watcher's tasks handle them.
#[derive(Clone)]
struct UnitState {
    state: String,
    since: f64,
    serial: u32,
}

/// What the watcher knows, shared with the requests.
#[derive(Default)]
struct Known {
    /// Subscribed on the bus now; the cache is current.
    connected: bool,
    /// Why the last connection failed, for a request that times out.
    trouble: Option<String>,
    units: HashMap<String, UnitState>,
    /// Each loaded unit's object path, to its name (signals name the path).
    paths: HashMap<String, String>,
    /// The names to load again after a new connection.
    names: Vec<String>,
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

/// Starts the agent's watcher now, with the agent: by the time the driver
/// asks, it is connected and follows the units asked before (a six-node
/// boot's first requests waited on their connection for 0.3-15 s).
pub fn start(now: fn() -> f64) {
    watcher(now);
}

/// The agent's one watcher, started with the agent (or by the first
/// request, in tests).
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

/// A failed answer that says why in a field of its own: the watcher is not
/// connected to the bus, which passes (the driver asks again).
fn not_connected(why: &str) -> Value {
    json!({"error": format!("{NOT_CONNECTED}{why}"), "not_connected": true})
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
    let known = w.lock();
    let first = known.next_seq;
    // Not connected within the window (early in boot dbus may start a
    // minute after the agent under TCG; a guest may have none): say so,
    // and the driver looks another way once and asks again.
    let left = || until.saturating_duration_since(Instant::now());
    let (known, _) = w
        .changed
        .wait_timeout_while(known, left(), |k| !k.connected)
        .unwrap_or_else(|p| p.into_inner());
    if !known.connected {
        let why = known.trouble.as_ref().map(|t| format!(" ({t})"));
        return Ok(not_connected(&why.unwrap_or_default()));
    }
    let refused = |k: &Known| {
        units
            .iter()
            .find_map(|u| Some((u, k.refused.get(u)?.clone())))
    };
    let answered = |k: &Known| {
        k.connected && units.iter().all(|u| k.units.contains_key(u)) && settled(k, units)
            || refused(k).is_some()
    };
    let (known, _) = w
        .changed
        .wait_timeout_while(known, left(), |k| !answered(k))
        .unwrap_or_else(|p| p.into_inner());
    if let Some((unit, why)) = refused(&known) {
        return Err(format!("systemd cannot load {unit:?}: {why}"));
    }
    if !known.connected {
        return Ok(not_connected(" (the bus went away)"));
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
    loop {
        let ended = rt.block_on(session(w, &mut asked, now));
        w.update(|k| {
            k.connected = false;
            k.units.clear();
            k.paths.clear();
            k.trouble = Some(ended.to_string());
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many signals may wait for the watcher's loop. The loop never waits
/// on anything else, so they do not pile up; zbus's default of 64 is a
/// bound it would hold the whole connection at.
const QUEUED: std::num::NonZeroUsize = std::num::NonZeroUsize::new(4096).unwrap();

/// One connection to the bus, until it fails: the names asked before are
/// loaded again, then signals and new names are followed as they come.
///
/// The loop itself never awaits a call: every call runs as a task of its
/// own. zbus holds the whole connection when a stream's queue is full, so
/// a loop waiting for a reply while signals filled its own queue would
/// wait for good (a six-node boot did: 64 signals came in during the loads
/// of seven units, and the answer never came).
async fn session(
    w: &'static Watcher,
    asked: &mut UnboundedReceiver<String>,
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
    signals.set_max_queued(QUEUED);
    if let Err(e) = call(&conn, MANAGER_PATH, MANAGER, "Subscribe", &()).await {
        return e;
    }
    for name in w.lock().names.clone() {
        tokio::spawn(load(conn.clone(), w, name));
    }
    w.update(|k| k.connected = true);
    loop {
        tokio::select! {
            message = signals.next() => match message {
                None => return zbus::Error::Failure("the bus closed the connection".into()),
                Some(Err(e)) => return e,
                Some(Ok(m)) => take_change(&conn, w, &m, now),
            },
            Some(name) = asked.recv() => {
                let mut k = w.lock();
                if !k.names.contains(&name) {
                    k.names.push(name.clone());
                    tokio::spawn(load(conn.clone(), w, name));
                }
            }
        }
    }
}

/// Connects to the system bus once its socket exists: the agent starts
/// before sockets.target. A look is one stat: every 20 ms for the first
/// 30 s, then every second (a guest without dbus never has one).
async fn connect() -> zbus::Result<zbus::Connection> {
    let began = Instant::now();
    while !std::path::Path::new(BUS_SOCKET).exists() {
        let early = began.elapsed() < Duration::from_secs(30);
        tokio::time::sleep(Duration::from_millis(if early { 20 } else { 1000 })).await;
    }
    zbus::connection::Builder::system().build().await
}

/// Loads the unit `name` (systemd knows it by path from then on) and
/// records its state. A name systemd refuses is recorded as refused (the
/// requests that ask for it fail) and forgotten: one bad name must not
/// keep the watcher down. Any other failure is the connection's, which
/// the loop sees too.
async fn load(conn: zbus::Connection, w: &'static Watcher, name: String) {
    let loaded = call(&conn, MANAGER_PATH, MANAGER, "LoadUnit", &(&name,)).await;
    let path: OwnedObjectPath = match loaded.and_then(|m| m.body().deserialize()) {
        Ok(path) => path,
        // systemd's error reply (zbus gives the standard names as FDO).
        Err(e @ (zbus::Error::MethodError(..) | zbus::Error::FDO(_))) => {
            return w.update(|k| {
                k.names.retain(|n| *n != name);
                k.refused.insert(name, e.to_string());
            });
        }
        Err(_) => return,
    };
    w.update(|k| drop(k.paths.insert(path.to_string(), name.clone())));
    let Ok((state, serial)) = property(&conn, &path, "ActiveState").await else {
        return;
    };
    let (Ok(state), Ok(since)) = (String::try_from(state), active_since(&conn, &path).await) else {
        return;
    };
    w.update(|k| {
        record(
            k,
            &name,
            UnitState {
                state,
                since,
                serial,
            },
        );
    });
}

/// Keeps `new` unless the watcher already knows a newer state of `unit`.
fn record(k: &mut Known, unit: &str, new: UnitState) -> bool {
    if k.units
        .get(unit)
        .is_some_and(|old| old.serial >= new.serial)
    {
        return false;
    }
    k.units.insert(unit.to_string(), new);
    true
}

/// Records a watched unit's new ActiveState, if `message` is the signal
/// that says so. A signal without the moment of entering active (systemd
/// sends it with ActiveState, but need not) is followed by a Get, as a
/// task of its own.
fn take_change(
    conn: &zbus::Connection,
    w: &'static Watcher,
    message: &zbus::Message,
    now: fn() -> f64,
) {
    let header = message.header();
    let Some(path) = header.path() else {
        return;
    };
    let Some(unit) = w.lock().paths.get(path.as_str()).cloned() else {
        return;
    };
    let Ok((interface, changed, _)) =
        message
            .body()
            .deserialize::<(String, BTreeMap<String, OwnedVariant>, Vec<String>)>()
    else {
        return;
    };
    let Some(state) = changed
        .get("ActiveState")
        .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
    else {
        return;
    };
    if interface != UNIT {
        return;
    }
    let serial = message.primary_header().serial_num().get();
    let at = now();
    let since = changed
        .get("ActiveEnterTimestampMonotonic")
        .and_then(|v| u64::try_from(v.try_clone().ok()?).ok())
        .map(|us| us as f64 / 1e6);
    w.update(|k| {
        let old = k.units.get(&unit).map(|u| u.since).unwrap_or_default();
        let new = UnitState {
            state: state.clone(),
            since: since.unwrap_or(old),
            serial,
        };
        if !record(k, &unit, new) {
            return;
        }
        let seq = k.next_seq;
        k.next_seq += 1;
        k.changes.push(Change {
            seq,
            unit: unit.clone(),
            state,
            at,
        });
        if k.changes.len() > KEPT_CHANGES {
            k.changes.remove(0);
        }
    });
    if since.is_none() {
        let (conn, path) = (conn.clone(), path.to_string());
        tokio::spawn(async move {
            if let Ok(since) = active_since(&conn, &path).await {
                w.update(|k| {
                    if let Some(u) = k.units.get_mut(&unit).filter(|u| u.serial == serial) {
                        u.since = since;
                    }
                });
            }
        });
    }
}

async fn active_since(conn: &zbus::Connection, path: &str) -> zbus::Result<f64> {
    let (entered, _) = property(conn, path, "ActiveEnterTimestampMonotonic").await?;
    Ok(u64::try_from(entered)? as f64 / 1e6)
}

/// One property of the unit at `path`, and the serial of systemd's reply.
async fn property(
    conn: &zbus::Connection,
    path: &str,
    name: &str,
) -> zbus::Result<(OwnedVariant, u32)> {
    let reply = call(conn, path, PROPERTIES, "Get", &(UNIT, name)).await?;
    let serial = reply.primary_header().serial_num().get();
    Ok((reply.body().deserialize()?, serial))
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
    fn an_older_message_changes_nothing_whatever_the_order() {
        let at = |state: &str, serial| UnitState {
            state: state.into(),
            since: 0.0,
            serial,
        };
        let mut k = Known::default();
        // A Get's reply (serial 9) handled before a signal systemd sent
        // earlier (serial 7): the reply's state stays.
        assert!(record(&mut k, "u", at("active", 9)));
        assert!(!record(&mut k, "u", at("activating", 7)));
        assert_eq!(k.units["u"].state, "active");
        assert!(record(&mut k, "u", at("failed", 12)));
        assert_eq!(k.units["u"].state, "failed");
    }

    #[test]
    fn the_watch_ends_when_all_are_active_or_one_failed() {
        let known = |v: &[&str]| -> (Known, Vec<String>) {
            let mut k = Known::default();
            for (i, s) in v.iter().enumerate() {
                let state = UnitState {
                    state: s.to_string(),
                    since: 0.0,
                    serial: 1,
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
