//! The guest agent's channel end to end, on the one-node cluster: commands
//! and files over virtio-serial, several at once, a deadline kept by the
//! agent, an agent killed mid-command (a named error, then a new channel),
//! and `status` / result.json naming the channel.

mod common;

use photon_cluster::error::{ErrorKind, kind_of};
use photon_cluster::guest::{self, ChannelKind};
use photon_cluster::state::StateDir;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Stops the cluster, also when an assertion fails first.
struct StopOnDrop<'a>(&'a Path, &'a Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let cluster = self.1.to_str().unwrap();
        common::run(self.0, &["--cluster", cluster, "stop", "--grace", "1"]);
    }
}

const SECS: Duration = Duration::from_secs(60);

#[test]
fn commands_files_deadlines_and_a_killed_agent_over_the_channel() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp.path(), &images);
    // The agent is asked for; SSH is the default channel.
    let text = std::fs::read_to_string(&cluster).unwrap();
    std::fs::write(
        &cluster,
        text.replace("[cluster]\n", "[cluster]\nchannel = \"agent\"\n"),
    )
    .unwrap();
    let state = tmp.path().join("state");
    let _stop = StopOnDrop(&state, &cluster);
    let c = cluster.to_str().unwrap();
    let out = common::run(&state, &["--cluster", c, "start", "--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(0), "start");

    // status names the channel.
    let out = common::run(&state, &["--cluster", c, "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["nodes"][0]["channel"], "agent", "{status}");

    let record = StateDir::new(PathBuf::from(format!("{}-one-node", state.display())))
        .unwrap()
        .load_running()
        .unwrap()
        .expect("a running cluster");
    assert_eq!(record.nodes["solo"].channel, Some(ChannelKind::Agent));
    // Readiness was pushed: only the agent's watch knows how long after the
    // units' own activation the driver learnt of it.
    let phases = record.nodes["solo"].phases.clone().unwrap();
    eprintln!("readiness noticed after {:?} s", phases.noticed_s);
    assert!(phases.noticed_s.is_some(), "{phases:?}");
    let g = Arc::new(guest::connect(&record, "solo").unwrap());
    assert_eq!(g.channel(), ChannelKind::Agent);

    // Exec: stdout, stderr and the exit code, framed.
    let o = g.exec("echo out; echo err >&2; exit 5", SECS).unwrap();
    assert_eq!((o.code, &*o.stdout, &*o.stderr), (5, "out\n", "err\n"));
    assert_eq!(g.exec("/bin/true", SECS).unwrap().code, 0);

    // Several at once: a command that hangs blocks none of the others, and
    // the agent ends it at its deadline (the channel stays usable).
    let hung = {
        let g = g.clone();
        std::thread::spawn(move || g.exec("sleep 600", Duration::from_secs(20)))
    };
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        let o = g.exec(&format!("echo {i}"), SECS).unwrap();
        assert_eq!(o.stdout, format!("{i}\n"));
    }
    assert!(!hung.is_finished(), "the others answered while one hangs");
    let err = hung.join().unwrap().unwrap_err();
    assert!(format!("{err}").contains("ended by the agent"), "{err:#}");
    let left = g.exec("pgrep -x sleep || true", SECS).unwrap();
    assert_eq!(left.stdout, "", "the deadline killed the command");

    // Files both ways, byte for byte.
    let ch = g.agent().expect("over the agent");
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    ch.put("/root/blob", &data, 0o600, SECS).unwrap();
    assert_eq!(
        g.exec("sha256sum /root/blob | cut -d' ' -f1", SECS)
            .unwrap()
            .stdout
            .trim(),
        sha256_hex(&data)
    );
    assert_eq!(ch.get("/root/blob", SECS).unwrap(), data);

    // The agent killed while a command runs: that command fails with the
    // named error within seconds, and the next connect gets a new channel.
    let running = {
        let g = g.clone();
        std::thread::spawn(move || g.exec("sleep 120", SECS))
    };
    std::thread::sleep(Duration::from_millis(500));
    let killer = guest::connect_ssh(&record, "solo").unwrap();
    let t = Instant::now();
    killer
        .succeed(
            "systemctl kill --signal=KILL photon-agent.service",
            Duration::from_secs(30),
        )
        .unwrap();
    let err = running.join().unwrap().unwrap_err();
    eprintln!(
        "killed agent noticed after {:.2} s: {err:#}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(kind_of(&err), ErrorKind::ChannelBroken, "{err:#}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let again = agent_again(&record);
    assert_eq!(again.exec("echo back", SECS).unwrap().stdout, "back\n");
    // QEMU's end of the port serves one client at a time: the lane below
    // (another process) gets the agent only once this process hung up.
    drop(again);
    drop(g);

    // `ssh NODE CMD` stays SSH; a node reached for lanes says its channel
    // in result.json.
    let out = common::run(&state, &["--cluster", c, "ssh", "solo", "echo", "via-ssh"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-ssh\n");
    let lane = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/channel-lane.toml");
    let root = tmp.path().join("artifacts");
    let out = common::run(
        &state,
        &[
            "--cluster",
            c,
            "smoke",
            "--lane-file",
            lane.to_str().unwrap(),
            "--artifacts",
            root.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "the lane passes");
    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("channel-lane/latest/result.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        result["nodes"]["solo"]["channel"], "agent",
        "{}",
        result["nodes"]
    );

    // A unit that fails while the agent watches it: systemd's change is
    // pushed (a oneshot is `activating` until its command ends), and the
    // wait names it, with its journal.
    let g = guest::connect(&record, "solo").unwrap();
    assert_eq!(g.channel(), ChannelKind::Agent);
    g.succeed(
        "systemd-run --no-block --unit=photon-broken -p Type=oneshot \
         sh -c 'sleep 5; echo broken-on-purpose; exit 3'",
        SECS,
    )
    .unwrap();
    let units = ["photon-broken.service".to_string()];
    let watched = g.agent().unwrap().units(&units, SECS).unwrap();
    assert_eq!(watched.states[0].1, "failed", "{:?}", watched.states);
    assert!(
        watched.changes.iter().any(|c| c["state"] == "failed"),
        "the failure came as a change: {:?}",
        watched.changes
    );
    let err = guest::wait_for_units(&g, &units, SECS, &|| None).unwrap_err();
    assert_eq!(kind_of(&err), ErrorKind::UnitFailed, "{err:#}");
    assert!(format!("{err:#}").contains("broken-on-purpose"), "{err:#}");

    // A name systemd refuses fails its own request at once, and the
    // agent's watcher stays up for the next one.
    let refused = g.agent().unwrap().units(&["not a unit".to_string()], SECS);
    let err = format!("{:#}", refused.err().expect("a name systemd refuses"));
    assert!(err.contains("cannot load"), "{err}");
    let ssh = g.agent().unwrap().units(&["ssh.service".to_string()], SECS);
    assert_eq!(ssh.unwrap().states[0].1, "active");

    // The agent stopped on purpose: the node is driven over SSH, and says
    // so; once the agent is back, over the agent again.
    g.succeed("systemctl stop photon-agent.service", SECS).ok();
    drop(g);
    let fallback = photon_cluster::wait::Wait::new("a fallback to SSH", SECS)
        .run(|| {
            Ok(match guest::connect(&record, "solo") {
                Ok(g) if g.channel() == ChannelKind::Ssh => photon_cluster::wait::Probe::Done(g),
                Ok(_) => photon_cluster::wait::Probe::Pending("the agent still answers".into()),
                Err(e) => photon_cluster::wait::Probe::Pending(format!("{e:#}")),
            })
        })
        .unwrap();
    assert_eq!(
        fallback.exec("echo over-ssh", SECS).unwrap().stdout,
        "over-ssh\n"
    );
    fallback
        .succeed("systemctl start photon-agent.service", SECS)
        .unwrap();
    drop(fallback);
    let back = agent_again(&record);
    drop(back);

    // A restore is ready through the agent: no SSH handshake on the way.
    let out = common::run(
        &state,
        &["--cluster", c, "snapshot", "save", "chan", "--stop"],
    );
    assert_eq!(out.status.code(), Some(0), "snapshot save");
    let t = Instant::now();
    let out = common::run(
        &state,
        &[
            "--cluster",
            c,
            "start",
            "--accel",
            "tcg",
            "--from-snapshot",
            "chan",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "restore");
    eprintln!(
        "restore to ready over the agent: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let out = common::run(&state, &["--cluster", c, "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["nodes"][0]["channel"], "agent", "{status}");
}

/// A guest over the agent, waited for (a restarted agent takes a moment).
fn agent_again(record: &photon_cluster::state::RunningCluster) -> guest::Guest {
    photon_cluster::wait::Wait::new("a channel over the agent", SECS)
        .run(|| {
            Ok(match guest::connect(record, "solo") {
                Ok(g) if g.channel() == ChannelKind::Agent => photon_cluster::wait::Probe::Done(g),
                Ok(_) => photon_cluster::wait::Probe::Pending("over SSH".into()),
                Err(e) => photon_cluster::wait::Probe::Pending(format!("{e:#}")),
            })
        })
        .unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
