//! Two clusters' fabrics side by side: each cluster's switch is its own
//! process with its own ports, so a frame flooded in one never reaches the
//! other's guests. The real `photon-cluster fabric-switch` processes run
//! here, with UDP sockets standing in for the QEMUs (no VM needed), and a
//! switch exits when its cluster record disappears.

mod common;

use std::net::UdpSocket;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A cluster's switch with `nodes` stand-in guests: (switch process, the
/// guests' sockets and the switch ports they send to, the watch file).
struct Fabric {
    switch: Child,
    guests: Vec<(UdpSocket, u16)>,
    watch: std::path::PathBuf,
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fabric(dir: &std::path::Path, nodes: usize) -> Fabric {
    std::fs::create_dir_all(dir).unwrap();
    let watch = dir.join("cluster.json");
    std::fs::write(&watch, "{}").unwrap();
    let mut guests = Vec::new();
    let mut ports = Vec::new();
    for i in 0..nodes {
        let guest = UdpSocket::bind("127.0.0.1:0").unwrap();
        guest
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let switch_port = free_udp_port();
        ports.push(serde_json::json!({
            "node": format!("node0{}", i + 1),
            "switch_port": switch_port,
            "qemu_port": guest.local_addr().unwrap().port(),
        }));
        guests.push((guest, switch_port));
    }
    let control = dir.join("control.sock");
    let config = serde_json::json!({ "ports": ports, "control": control, "watch": watch });
    let config_file = dir.join("switch.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let switch = common::bin()
        .args(["fabric-switch", "--config"])
        .arg(&config_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !control.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the switch never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Fabric {
        switch,
        guests,
        watch,
    }
}

/// A broadcast ARP-like frame from `mac_last` (the frame's content does not matter).
fn broadcast(mac_last: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend([0x52, 0x54, 0x00, 0x4d, 0x00, mac_last]);
    f.extend([0x08, 0x06]);
    f.extend([0u8; 46]);
    f
}

fn received(sock: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

#[test]
fn two_clusters_side_by_side_never_see_each_others_frames() {
    let base = std::env::temp_dir().join(format!("pc-fabric-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    // The same node names, MACs and addresses in both, as two checkouts of
    // one cluster definition would have.
    let mut a = fabric(&base.join("a"), 3);
    let mut b = fabric(&base.join("b"), 3);

    let frame = broadcast(1);
    let (sender, port) = &a.guests[0];
    sender.send_to(&frame, ("127.0.0.1", *port)).unwrap();
    for (g, _) in &a.guests[1..] {
        assert_eq!(received(g).as_deref(), Some(&frame[..]), "flooded within A");
    }
    for (g, _) in &b.guests {
        assert_eq!(received(g), None, "B saw a frame of A");
    }
    let frame = broadcast(2);
    let (sender, port) = &b.guests[1];
    sender.send_to(&frame, ("127.0.0.1", *port)).unwrap();
    for (i, (g, _)) in b.guests.iter().enumerate() {
        if i != 1 {
            assert_eq!(received(g).as_deref(), Some(&frame[..]), "flooded within B");
        }
    }
    for (g, _) in &a.guests {
        assert_eq!(received(g), None, "A saw a frame of B");
    }

    // Each switch lives exactly as long as its cluster record.
    std::fs::remove_file(&a.watch).unwrap();
    let t = Instant::now();
    while a.switch.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "A's switch outlived its record"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.switch.try_wait().unwrap().is_none(),
        "B's switch is unaffected"
    );
    std::fs::remove_file(&b.watch).unwrap();
    let t = Instant::now();
    while b.switch.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "B's switch outlived its record"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&base);
}
