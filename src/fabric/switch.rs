//! A rootless userspace L2 switch for the cluster fabric.
//!
//! Each guest's QEMU uses a UDP socket netdev
//! (`-netdev socket,udp=127.0.0.1:<switch_port>,localaddr=127.0.0.1:<qemu_port>`):
//! it sends every Ethernet frame as one datagram to its switch port and reads
//! the frames meant for it on its own port. Unlike a multicast segment, a
//! switch in the middle sees and steers every frame, which is what lets us
//! partition the cluster, degrade links and capture traffic without root.
//!
//! The forwarding decisions live in `Forwarding`, a plain struct with no I/O,
//! so they are tested without sockets; [`serve`] wraps it in a tokio runtime
//! and [`request`] is the control client.

use anyhow::{Context, Result, bail};
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortSpec {
    pub node: String,
    pub switch_port: u16,
    pub qemu_port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchConfig {
    pub ports: Vec<PortSpec>,
    /// Unix socket for control requests (JSON, one request line -> one reply line).
    pub control: PathBuf,
    /// The switch exits when this file no longer exists (polled every 500 ms): the cluster record.
    pub watch: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkFault {
    /// Probability (0.0..=1.0) that a frame is lost.
    pub loss: f64,
    pub delay_ms: u64,
    /// Probability (0.0..=1.0) that a frame is delivered twice.
    pub duplicate: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Nodes in different groups cannot reach each other; a node in no group reaches everyone.
    Partition {
        groups: Vec<Vec<String>>,
    },
    /// Undo the partition and every link fault.
    Heal,
    /// Apply (or with LinkFault::default() clear) a fault on frames to AND from this node.
    Link {
        node: String,
        fault: LinkFault,
    },
    /// Start writing every frame the switch receives to this pcap file (None: stop and close).
    Capture {
        path: Option<PathBuf>,
    },
    Shutdown,
}

/// Per-port counters. Ingress counters (`rx_*`) are on the port a frame came
/// in by; everything about a copy (`tx_frames`, both `dropped_*`,
/// `duplicated`) is on the port the copy was to leave by. So for every port,
/// copies addressed to it = tx_frames - duplicated + dropped_partition + dropped_loss.
/// `tx_frames` counts copies handed to the socket: a send that fails because
/// the guest's QEMU is not listening (it is restarting) still counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PortCounters {
    pub node: String,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bytes: u64,
    pub dropped_partition: u64,
    pub dropped_loss: u64,
    pub duplicated: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub ports: Vec<PortCounters>,
    pub partition: Option<Vec<Vec<String>>>,
    pub links: BTreeMap<String, LinkFault>,
    pub capture: Option<PathBuf>,
    /// Frames written by the running capture, or by the last one once stopped.
    pub captured_frames: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Ok { status: Status },
    Error { message: String },
}

/// Destination MAC, source MAC, EtherType.
const ETH_HEADER: usize = 14;
/// Larger than any UDP datagram, so no frame is ever truncated.
const MAX_FRAME: usize = 65536;
/// A guest spraying random source MACs must not grow the table without
/// bound; forgetting everything only costs some flooding until relearned.
const MAX_MACS: usize = 4096;
const WATCH_EVERY: Duration = Duration::from_millis(500);

type Mac = [u8; 6];

fn is_group(mac: &[u8]) -> bool {
    mac[0] & 1 == 1
}

/// The switch's decisions: learning, flooding, partition and link faults.
struct Forwarding {
    names: Vec<String>,
    macs: HashMap<Mac, usize>,
    /// As requested, for the status.
    partition: Option<Vec<Vec<String>>>,
    /// The partition as a group per port; None reaches every port.
    group: Vec<Option<usize>>,
    faults: Vec<LinkFault>,
    counters: Vec<PortCounters>,
}

impl Forwarding {
    fn new(names: Vec<String>) -> Self {
        let n = names.len();
        let counters = names
            .iter()
            .map(|node| PortCounters {
                node: node.clone(),
                ..Default::default()
            })
            .collect();
        Forwarding {
            names,
            macs: HashMap::new(),
            partition: None,
            group: vec![None; n],
            faults: vec![LinkFault::default(); n],
            counters,
        }
    }

    fn port(&self, node: &str) -> Result<usize, String> {
        self.names.iter().position(|n| n == node).ok_or_else(|| {
            format!(
                "unknown node {node:?}; the switch has {}",
                self.names.join(", ")
            )
        })
    }

    /// Where a frame received on `from` goes: one entry per copy to send,
    /// with the delay before sending it.
    fn route(
        &mut self,
        from: usize,
        frame: &[u8],
        rng: &mut fastrand::Rng,
    ) -> Vec<(usize, Duration)> {
        let rx = &mut self.counters[from];
        rx.rx_frames += 1;
        rx.rx_bytes += frame.len() as u64;
        if frame.len() < ETH_HEADER {
            return Vec::new();
        }
        let (dst, src) = (&frame[0..6], &frame[6..12]);
        if !is_group(src) {
            if self.macs.len() >= MAX_MACS && !self.macs.contains_key(src) {
                self.macs.clear();
            }
            self.macs.insert(src.try_into().expect("6 bytes"), from);
        }
        let learned = if is_group(dst) {
            None
        } else {
            self.macs.get(dst)
        };
        let targets: Vec<usize> = match learned {
            // Its owner is on the port it came from: the segment already has it.
            Some(&to) if to == from => Vec::new(),
            Some(&to) => vec![to],
            None => (0..self.names.len()).filter(|&to| to != from).collect(),
        };
        let mut copies = Vec::new();
        for to in targets {
            self.copy(from, to, rng, &mut copies);
        }
        copies
    }

    fn copy(
        &mut self,
        from: usize,
        to: usize,
        rng: &mut fastrand::Rng,
        out: &mut Vec<(usize, Duration)>,
    ) {
        let counters = &mut self.counters[to];
        if let (Some(a), Some(b)) = (self.group[from], self.group[to])
            && a != b
        {
            counters.dropped_partition += 1;
            return;
        }
        // Both ends' faults apply, like two bad cables in series.
        let (a, b) = (self.faults[from], self.faults[to]);
        let hit = |rng: &mut fastrand::Rng, p: f64| p > 0.0 && rng.f64() < p;
        if hit(rng, a.loss) || hit(rng, b.loss) {
            counters.dropped_loss += 1;
            return;
        }
        let delay = Duration::from_millis(a.delay_ms.max(b.delay_ms));
        out.push((to, delay));
        counters.tx_frames += 1;
        if hit(rng, a.duplicate) || hit(rng, b.duplicate) {
            out.push((to, delay));
            counters.tx_frames += 1;
            counters.duplicated += 1;
        }
    }

    /// Validates everything before changing anything, so a refused request
    /// leaves the partition as it was.
    fn set_partition(&mut self, groups: Vec<Vec<String>>) -> Result<(), String> {
        let mut group = vec![None; self.names.len()];
        for (g, members) in groups.iter().enumerate() {
            for node in members {
                let port = self.port(node)?;
                match group[port] {
                    Some(other) if other != g => {
                        return Err(format!("node {node:?} is in two groups ({other} and {g})"));
                    }
                    _ => group[port] = Some(g),
                }
            }
        }
        self.group = group;
        self.partition = Some(groups);
        Ok(())
    }

    fn heal(&mut self) {
        self.partition = None;
        self.group.fill(None);
        self.faults.fill(LinkFault::default());
    }

    fn set_link(&mut self, node: &str, fault: LinkFault) -> Result<(), String> {
        let port = self.port(node)?;
        for (what, p) in [("loss", fault.loss), ("duplicate", fault.duplicate)] {
            // Written this way round so that NaN is refused too.
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{what} must be between 0.0 and 1.0, not {p}"));
            }
        }
        self.faults[port] = fault;
        Ok(())
    }

    fn status(&self) -> Status {
        let links = self
            .names
            .iter()
            .zip(&self.faults)
            .filter(|(_, f)| **f != LinkFault::default())
            .map(|(n, f)| (n.clone(), *f))
            .collect();
        Status {
            ports: self.counters.clone(),
            partition: self.partition.clone(),
            links,
            ..Default::default()
        }
    }
}

struct Capture {
    path: PathBuf,
    pcap: PcapWriter<BufWriter<File>>,
}

impl Capture {
    fn create(path: PathBuf) -> Result<Self, String> {
        let fail = |e: &dyn std::fmt::Display| format!("capture {}: {e}", path.display());
        let file = File::create(&path).map_err(|e| fail(&e))?;
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            snaplen: MAX_FRAME as u32,
            ..Default::default()
        };
        let pcap = PcapWriter::with_header(BufWriter::new(file), header).map_err(|e| fail(&e))?;
        Ok(Capture { path, pcap })
    }

    /// Flushes, so the file is complete when the reply says it stopped.
    fn finish(self) -> Result<(), String> {
        let path = self.path;
        self.pcap
            .into_writer()
            .flush()
            .map_err(|e| format!("capture {}: {e}", path.display()))
    }
}

/// Everything the runtime's tasks share, behind one std Mutex (never held across an await).
struct Shared {
    fwd: Forwarding,
    capture: Option<Capture>,
    captured_frames: u64,
}

impl Shared {
    fn new(names: Vec<String>) -> Self {
        Shared {
            fwd: Forwarding::new(names),
            capture: None,
            captured_frames: 0,
        }
    }

    /// Records a frame as received, before any drop decision: the capture
    /// shows what the guests sent, the counters show what became of it.
    fn capture_frame(&mut self, frame: &[u8]) {
        let Some(capture) = &mut self.capture else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let written = capture
            .pcap
            .write_packet(&PcapPacket::new(now, frame.len() as u32, frame));
        match written {
            Ok(_) => self.captured_frames += 1,
            Err(e) => {
                // The status shows it: no capture running any more.
                tracing::warn!("switch: capture {} stopped: {e}", capture.path.display());
                self.capture = None;
            }
        }
    }

    fn start_capture(&mut self, path: PathBuf) -> Result<(), String> {
        // The running one is finished first: the new path may be the same file.
        self.stop_capture()?;
        self.capture = Some(Capture::create(path)?);
        self.captured_frames = 0;
        Ok(())
    }

    fn stop_capture(&mut self) -> Result<(), String> {
        self.capture.take().map_or(Ok(()), Capture::finish)
    }

    fn status(&self) -> Status {
        Status {
            capture: self.capture.as_ref().map(|c| c.path.clone()),
            captured_frames: self.captured_frames,
            ..self.fwd.status()
        }
    }

    fn apply(&mut self, req: Request) -> Reply {
        let done = match req {
            Request::Status => Ok(()),
            Request::Partition { groups } => self.fwd.set_partition(groups),
            Request::Heal => {
                self.fwd.heal();
                Ok(())
            }
            Request::Link { node, fault } => self.fwd.set_link(&node, fault),
            Request::Capture { path: Some(path) } => self.start_capture(path),
            Request::Capture { path: None } => self.stop_capture(),
            // Stopped before the reply, so the file is complete once the client has it.
            Request::Shutdown => self.stop_capture(),
        };
        match done {
            Ok(()) => Reply::Ok {
                status: self.status(),
            },
            Err(message) => Reply::Error { message },
        }
    }
}

/// The state stays consistent through a panic (each update is a few plain
/// assignments), so one failed task must not take the whole switch down.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs the switch until `watch` disappears or a Shutdown request arrives. Blocking: builds a
/// current-thread tokio runtime (so call it from a plain thread, not from inside a runtime).
/// Binds every switch_port on 127.0.0.1 FIRST and only then creates the control socket
/// (removing a stale one first), so a client that sees the control socket can rely on the
/// ports being bound. `watch` must exist before the call.
pub fn serve(config: SwitchConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("switch: tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: SwitchConfig) -> Result<()> {
    let names: Vec<String> = config.ports.iter().map(|p| p.node.clone()).collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            bail!("switch: node {name} has two ports");
        }
    }
    let mut egress = Vec::new();
    for p in &config.ports {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, p.switch_port))
            .await
            .with_context(|| format!("switch: port 127.0.0.1:{} for {}", p.switch_port, p.node))?;
        egress.push(Egress::new(Arc::new(socket), p.qemu_port));
    }
    let control = &config.control;
    match std::fs::remove_file(control) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("switch: stale {}", control.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(control).with_context(|| format!("switch: {}", control.display()))?;
    tracing::info!(ports = names.len(), control = %control.display(), "switch: started");

    let shared = Arc::new(Mutex::new(Shared::new(names)));
    let egress = Arc::new(egress);
    for from in 0..egress.len() {
        tokio::spawn(pump(from, shared.clone(), egress.clone()));
    }
    let stop = Arc::new(Notify::new());
    let mut watch = tokio::time::interval(WATCH_EVERY);
    let reason = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    tokio::spawn(serve_control(stream, shared.clone(), stop.clone()));
                }
                // Out of file descriptors, say: pause rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            _ = stop.notified() => break "shutdown requested",
            _ = watch.tick() => {
                if !config.watch.exists() {
                    break "cluster record gone";
                }
            }
        }
    };
    let flushed = lock(&shared).stop_capture();
    let _ = std::fs::remove_file(control);
    tracing::info!(reason, "switch: stopped");
    flushed.map_err(anyhow::Error::msg)
}

/// One port's way out to its guest.
struct Egress {
    /// QEMU was told its peer is 127.0.0.1:switch_port, so frames to it
    /// leave from exactly that address, whether or not QEMU checks.
    socket: Arc<UdpSocket>,
    qemu: SocketAddr,
    delayed: mpsc::UnboundedSender<(Instant, Arc<[u8]>)>,
}

impl Egress {
    fn new(socket: Arc<UdpSocket>, qemu_port: u16) -> Self {
        let qemu = SocketAddr::from((Ipv4Addr::LOCALHOST, qemu_port));
        let (delayed, mut line) = mpsc::unbounded_channel::<(Instant, Arc<[u8]>)>();
        let out = socket.clone();
        // One delay line per port, in arrival order, rather than a timer per
        // frame: tokio does not promise that timers due in the same
        // millisecond fire in the order they were set, and a fault meant to
        // delay must not also reorder.
        tokio::spawn(async move {
            while let Some((due, frame)) = line.recv().await {
                tokio::time::sleep_until(due).await;
                let _ = out.send_to(&frame, qemu).await;
            }
        });
        Egress {
            socket,
            qemu,
            delayed,
        }
    }

    async fn send(&self, frame: &[u8], delay: Duration) {
        // Errors are ignored: while a node restarts nobody listens on its
        // port, and a frame lost then is what an unplugged cable does.
        if delay.is_zero() {
            let _ = self.socket.send_to(frame, self.qemu).await;
        } else {
            let _ = self
                .delayed
                .send((Instant::now() + delay, Arc::from(frame)));
        }
    }
}

/// Receives one port's frames and forwards them.
async fn pump(from: usize, shared: Arc<Mutex<Shared>>, egress: Arc<Vec<Egress>>) {
    let socket = egress[from].socket.clone();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut rng = fastrand::Rng::new();
    loop {
        let n = match socket.recv_from(&mut buf).await {
            Ok((n, _)) => n,
            // Not expected on an unconnected socket; should one persist,
            // the pause keeps this loop from spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let frame = &buf[..n];
        let copies = {
            let mut s = lock(&shared);
            s.capture_frame(frame);
            s.fwd.route(from, frame, &mut rng)
        };
        for (to, delay) in copies {
            egress[to].send(frame, delay).await;
        }
    }
}

/// One control connection: a JSON request per line, a JSON reply per line.
async fn serve_control(stream: UnixStream, shared: Arc<Mutex<Shared>>, stop: Arc<Notify>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let (reply, last) = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let last = req == Request::Shutdown;
                let reply = lock(&shared).apply(req);
                (reply, last)
            }
            Err(e) => {
                let message = format!("bad request {line:?}: {e}");
                (Reply::Error { message }, false)
            }
        };
        let mut text = serde_json::to_string(&reply).expect("a reply serializes");
        text.push('\n');
        let sent = write.write_all(text.as_bytes()).await;
        if last {
            stop.notify_one();
            return;
        }
        if sent.is_err() {
            return;
        }
    }
}

/// Client side, plain std (no tokio): connect to the control socket, send one JSON line, read
/// one reply line. A Reply::Error becomes an Err with its message. Connecting to a Unix socket
/// does not wait (it fails at once when nobody listens), so `timeout` bounds the exchange:
/// each write and read.
pub fn request(control: &Path, req: &Request, timeout: Duration) -> Result<Status> {
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;

    let at = || format!("switch control socket {}", control.display());
    let mut stream = UnixStream::connect(control).with_context(at)?;
    // A zero timeout means "none" to the OS.
    let timeout = timeout.max(Duration::from_millis(1));
    stream.set_read_timeout(Some(timeout)).with_context(at)?;
    stream.set_write_timeout(Some(timeout)).with_context(at)?;
    let mut line = serde_json::to_string(req).context("switch request")?;
    line.push('\n');
    stream.write_all(line.as_bytes()).with_context(at)?;

    let mut reply = String::new();
    let read = std::io::BufReader::new(stream).read_line(&mut reply);
    match read {
        Ok(0) => bail!("{}: closed without a reply", at()),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            bail!("{}: no reply within {timeout:?}", at())
        }
        Err(e) => return Err(e).with_context(at),
    }
    match serde_json::from_str(&reply).with_context(|| format!("{}: bad reply {reply:?}", at()))? {
        Reply::Ok { status } => Ok(status),
        Reply::Error { message } => bail!("{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::PcapReader;
    use std::net::UdpSocket as StdUdpSocket;
    use std::sync::mpsc as std_mpsc;

    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    const D: usize = 3;
    const BROADCAST: Mac = [0xff; 6];

    fn mac(port: usize) -> Mac {
        [0x52, 0x54, 0x00, 0x4d, 0x00, port as u8 + 1]
    }

    /// A minimum-size Ethernet frame (60 bytes without FCS), filled with `tag`.
    fn frame(dst: Mac, src: Mac, tag: u8) -> Vec<u8> {
        let mut f = [dst, src].concat();
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, tag);
        f
    }

    fn switch(n: usize) -> Forwarding {
        Forwarding::new(
            ["a", "b", "c", "d"][..n]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    }

    /// Routes a frame from `from` to `to`'s MAC; returns the egress ports.
    fn send(f: &mut Forwarding, from: usize, to: usize, rng: &mut fastrand::Rng) -> Vec<usize> {
        let copies = f.route(from, &frame(mac(to), mac(from), 0), rng);
        copies.into_iter().map(|(port, _)| port).collect()
    }

    /// Every port says something, so every MAC is learned.
    fn learn_all(f: &mut Forwarding, rng: &mut fastrand::Rng) {
        for from in 0..f.names.len() {
            f.route(from, &frame(BROADCAST, mac(from), 0), rng);
        }
    }

    #[test]
    fn unknown_unicast_floods_learned_unicast_goes_to_one_port() {
        let (mut f, mut rng) = (switch(3), fastrand::Rng::with_seed(1));
        // Nobody has spoken: c's MAC is unknown.
        assert_eq!(send(&mut f, A, C, &mut rng), [B, C]);
        // a was learned from that frame.
        assert_eq!(send(&mut f, C, A, &mut rng), [A]);
        assert_eq!(send(&mut f, A, C, &mut rng), [C]);
        assert_eq!(send(&mut f, A, B, &mut rng), [B, C], "b is still unknown");
        let broadcast = f.route(B, &frame(BROADCAST, mac(B), 0), &mut rng);
        assert_eq!(broadcast, [(A, Duration::ZERO), (C, Duration::ZERO)]);
        // IPv6 neighbour discovery: multicast floods too.
        let multicast = f.route(B, &frame([0x33, 0x33, 0, 0, 0, 1], mac(B), 0), &mut rng);
        assert_eq!(multicast.len(), 2);
        assert_eq!(send(&mut f, A, B, &mut rng), [B]);
        // A frame for a MAC on its own port is already where it belongs.
        assert!(f.route(A, &frame(mac(A), mac(A), 0), &mut rng).is_empty());
        assert!(
            f.route(A, &[0u8; 13], &mut rng).is_empty(),
            "a runt is dropped"
        );

        let s = f.status();
        assert_eq!(s.ports[A].rx_frames, 6);
        assert_eq!(s.ports[A].rx_bytes, 5 * 60 + 13);
        assert_eq!(s.ports[B].tx_frames, 3);
        assert_eq!(s.ports[C].tx_frames, 5);
    }

    #[test]
    fn partition_separates_groups_and_heal_restores() {
        let (mut f, mut rng) = (switch(4), fastrand::Rng::with_seed(1));
        learn_all(&mut f, &mut rng);
        let groups = vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["c".to_string()],
        ];
        f.set_partition(groups.clone()).unwrap();
        assert!(send(&mut f, A, C, &mut rng).is_empty());
        assert!(send(&mut f, C, A, &mut rng).is_empty());
        assert_eq!(f.counters[C].dropped_partition, 1);
        assert_eq!(f.counters[A].dropped_partition, 1);
        assert_eq!(send(&mut f, A, B, &mut rng), [B]);
        // d is in no group: it reaches everyone and everyone reaches it.
        for other in [A, B, C] {
            assert_eq!(send(&mut f, D, other, &mut rng), [other]);
            assert_eq!(send(&mut f, other, D, &mut rng), [D]);
        }
        let broadcast = f.route(A, &frame(BROADCAST, mac(A), 0), &mut rng);
        assert_eq!(broadcast.iter().map(|c| c.0).collect::<Vec<_>>(), [B, D]);
        assert_eq!(f.counters[C].dropped_partition, 2);
        assert_eq!(f.status().partition, Some(groups));

        f.heal();
        assert_eq!(send(&mut f, A, C, &mut rng), [C]);
        assert_eq!(send(&mut f, C, A, &mut rng), [A]);
        assert_eq!(f.status().partition, None);
    }

    #[test]
    fn a_refused_partition_changes_nothing() {
        let mut f = switch(3);
        let err = f
            .set_partition(vec![vec!["a".into()], vec!["zz".into()]])
            .unwrap_err();
        assert!(err.contains("\"zz\"") && err.contains("a, b, c"), "{err}");
        let err = f
            .set_partition(vec![vec!["a".into(), "b".into()], vec!["b".into()]])
            .unwrap_err();
        assert!(err.contains("\"b\" is in two groups"), "{err}");
        assert_eq!(f.partition, None);
        assert_eq!(f.group, [None, None, None]);
    }

    #[test]
    fn link_faults_lose_duplicate_and_delay() {
        let (mut f, mut rng) = (switch(3), fastrand::Rng::with_seed(1));
        learn_all(&mut f, &mut rng);
        let lossy = LinkFault {
            loss: 1.0,
            ..Default::default()
        };
        f.set_link("c", lossy).unwrap();
        for _ in 0..20 {
            assert!(send(&mut f, A, C, &mut rng).is_empty());
            assert!(send(&mut f, C, B, &mut rng).is_empty());
        }
        assert_eq!(f.counters[C].dropped_loss, 20);
        assert_eq!(f.counters[B].dropped_loss, 20);
        assert_eq!(send(&mut f, A, B, &mut rng), [B]);
        assert_eq!(f.status().links, BTreeMap::from([("c".to_string(), lossy)]));
        f.set_link("c", LinkFault::default()).unwrap();
        assert_eq!(send(&mut f, A, C, &mut rng), [C]);
        assert!(f.status().links.is_empty());

        let dup = LinkFault {
            duplicate: 1.0,
            delay_ms: 30,
            ..Default::default()
        };
        f.set_link("b", dup).unwrap();
        f.set_link(
            "a",
            LinkFault {
                delay_ms: 50,
                ..Default::default()
            },
        )
        .unwrap();
        let copies = f.route(A, &frame(mac(B), mac(A), 0), &mut rng);
        let late = Duration::from_millis(50);
        assert_eq!(copies, [(B, late), (B, late)], "the larger delay wins");
        assert_eq!(f.counters[B].duplicated, 1);
        let copies = f.route(C, &frame(mac(B), mac(C), 0), &mut rng);
        assert_eq!(copies, [(B, Duration::from_millis(30)); 2]);

        let err = f
            .set_link(
                "b",
                LinkFault {
                    loss: 1.5,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(err.contains("loss"), "{err}");
        assert!(
            f.set_link(
                "b",
                LinkFault {
                    duplicate: f64::NAN,
                    ..Default::default()
                }
            )
            .is_err()
        );
        assert_eq!(f.faults[B], dup, "a refused fault changes nothing");
        f.heal();
        assert!(f.status().links.is_empty());
    }

    #[test]
    fn capture_writes_a_readable_pcap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fabric.pcap");
        let mut s = Shared::new(vec!["a".into(), "b".into()]);
        let frames = [
            frame(BROADCAST, mac(A), 1),
            frame(mac(A), mac(B), 2),
            vec![7; 1500],
        ];
        s.capture_frame(&frames[0]);
        let reply = s.apply(Request::Capture {
            path: Some(path.clone()),
        });
        assert!(matches!(&reply, Reply::Ok { status } if status.capture == Some(path.clone())));
        for f in &frames {
            s.capture_frame(f);
        }
        let Reply::Ok { status } = s.apply(Request::Capture { path: None }) else {
            panic!("stopping the capture failed");
        };
        assert_eq!((status.capture, status.captured_frames), (None, 3));

        let mut reader = PcapReader::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.header().datalink, DataLink::ETHERNET);
        let mut read = Vec::new();
        while let Some(packet) = reader.next_packet() {
            read.push(packet.unwrap().data.into_owned());
        }
        assert_eq!(read, frames);
    }

    /// A switch running in a thread, with plain UDP sockets playing the QEMUs.
    struct Running {
        dir: tempfile::TempDir,
        control: PathBuf,
        watch: PathBuf,
        switch_ports: Vec<u16>,
        qemus: Vec<StdUdpSocket>,
        done: std_mpsc::Receiver<Result<()>>,
    }

    impl Running {
        fn start(nodes: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let watch = dir.path().join("cluster.json");
            std::fs::write(&watch, "{}").unwrap();
            let control = dir.path().join("switch.sock");
            // Held until all are chosen, so the kernel hands out distinct ports.
            let probes: Vec<_> = nodes
                .iter()
                .map(|_| StdUdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            let switch_ports: Vec<u16> = probes
                .iter()
                .map(|s| s.local_addr().unwrap().port())
                .collect();
            drop(probes);
            let qemus: Vec<_> = nodes
                .iter()
                .map(|_| StdUdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            let ports = nodes
                .iter()
                .zip(&switch_ports)
                .zip(&qemus)
                .map(|((node, &switch_port), qemu)| PortSpec {
                    node: node.to_string(),
                    switch_port,
                    qemu_port: qemu.local_addr().unwrap().port(),
                })
                .collect();
            let config = SwitchConfig {
                ports,
                control: control.clone(),
                watch: watch.clone(),
            };
            let (tx, done) = std_mpsc::channel();
            std::thread::spawn(move || tx.send(serve(config)));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !control.exists() {
                if let Ok(r) = done.try_recv() {
                    panic!("the switch exited at start: {r:?}");
                }
                assert!(std::time::Instant::now() < deadline, "no control socket");
                std::thread::sleep(Duration::from_millis(10));
            }
            Running {
                dir,
                control,
                watch,
                switch_ports,
                qemus,
                done,
            }
        }

        fn send(&self, from: usize, frame: &[u8]) {
            let to = (Ipv4Addr::LOCALHOST, self.switch_ports[from]);
            self.qemus[from].send_to(frame, to).unwrap();
        }

        /// The next frame for this port's guest; a busy machine may take a while.
        fn recv(&self, port: usize) -> Vec<u8> {
            self.recv_within(port, Duration::from_secs(5))
                .expect("a frame")
        }

        /// Whether no frame comes for this port's guest within 300 ms.
        fn silent(&self, port: usize) -> bool {
            self.recv_within(port, Duration::from_millis(300)).is_none()
        }

        fn recv_within(&self, port: usize, wait: Duration) -> Option<Vec<u8>> {
            let mut buf = vec![0; MAX_FRAME];
            self.qemus[port].set_read_timeout(Some(wait)).unwrap();
            let (n, sender) = self.qemus[port].recv_from(&mut buf).ok()?;
            let own = self.switch_ports[port];
            assert_eq!(sender.port(), own, "sent from the port's own socket");
            Some(buf[..n].to_vec())
        }

        fn request(&self, req: Request) -> Result<Status> {
            request(&self.control, &req, Duration::from_secs(5))
        }

        fn assert_stopped(&self) {
            let result = self.done.recv_timeout(Duration::from_secs(5));
            assert!(matches!(result, Ok(Ok(()))), "{result:?}");
            assert!(!self.control.exists(), "control socket removed");
        }
    }

    #[test]
    fn end_to_end_over_udp() {
        let sw = Running::start(&["a", "b", "c"]);
        let hello = frame(BROADCAST, mac(A), 1);
        sw.send(A, &hello);
        assert_eq!(sw.recv(B), hello);
        assert_eq!(sw.recv(C), hello);
        let reply = frame(mac(A), mac(C), 2);
        sw.send(C, &reply);
        assert_eq!(sw.recv(A), reply);
        assert!(sw.silent(B), "a is learned: no flood");
        sw.send(B, &frame(BROADCAST, mac(B), 3));
        sw.recv(A);
        sw.recv(C);

        let groups = vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["c".to_string()],
        ];
        sw.request(Request::Partition { groups }).unwrap();
        sw.send(A, &frame(mac(C), mac(A), 4));
        assert!(sw.silent(C), "partitioned");
        let ab = frame(mac(B), mac(A), 5);
        sw.send(A, &ab);
        assert_eq!(sw.recv(B), ab);
        let status = sw.request(Request::Status).unwrap();
        assert_eq!(status.ports[C].dropped_partition, 1);
        assert_eq!(status.ports[A].rx_frames, 3);

        let status = sw.request(Request::Heal).unwrap();
        assert_eq!(status.partition, None);
        let ac = frame(mac(C), mac(A), 6);
        sw.send(A, &ac);
        assert_eq!(sw.recv(C), ac);

        let slow = LinkFault {
            delay_ms: 200,
            ..Default::default()
        };
        sw.request(Request::Link {
            node: "b".into(),
            fault: slow,
        })
        .unwrap();
        let sent = std::time::Instant::now();
        let burst: Vec<_> = (10..15).map(|tag| frame(mac(B), mac(A), tag)).collect();
        for f in &burst {
            sw.send(A, f);
        }
        let got: Vec<_> = burst.iter().map(|_| sw.recv(B)).collect();
        assert!(sent.elapsed() >= Duration::from_millis(200), "delayed");
        assert_eq!(got, burst, "delayed, not reordered");

        std::fs::remove_file(&sw.watch).unwrap();
        sw.assert_stopped();
    }

    #[test]
    fn unknown_nodes_are_refused_and_shutdown_flushes_the_capture() {
        let sw = Running::start(&["a", "b"]);
        let fault = LinkFault {
            loss: 0.5,
            ..Default::default()
        };
        let err = sw
            .request(Request::Link {
                node: "zz".into(),
                fault,
            })
            .unwrap_err();
        assert!(
            err.to_string().contains("\"zz\"") && err.to_string().contains("a, b"),
            "{err}"
        );
        let groups = vec![vec!["a".to_string()], vec!["zz".to_string()]];
        let err = sw.request(Request::Partition { groups }).unwrap_err();
        assert!(err.to_string().contains("\"zz\""), "{err}");
        let status = sw.request(Request::Status).unwrap();
        assert_eq!((status.partition, status.links.len()), (None, 0));

        // The reply to Shutdown comes after the capture is flushed.
        let path = sw.dir.path().join("fabric.pcap");
        sw.request(Request::Capture {
            path: Some(path.clone()),
        })
        .unwrap();
        let hello = frame(BROADCAST, mac(A), 1);
        sw.send(A, &hello);
        sw.recv(B);
        let status = sw.request(Request::Shutdown).unwrap();
        assert_eq!((status.capture, status.captured_frames), (None, 1));
        let mut reader = PcapReader::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.next_packet().unwrap().unwrap().data, hello);
        assert!(reader.next_packet().is_none());
        sw.assert_stopped();
    }
}
