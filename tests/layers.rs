//! The ready cluster as something to restore from elsewhere: a snapshot
//! saved in one state directory, made read-only as a Nix store path is, and
//! restored twice at once into two other directories, onto host ports
//! chosen afresh. One small guest (the one-node cluster).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Stops whatever a test started, also when an assertion fails first.
struct StopOnDrop(Vec<PathBuf>, PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let cluster = self.1.to_str().unwrap();
        for state in &self.0 {
            common::run(state, &["--cluster", cluster, "stop", "--grace", "1"]);
        }
    }
}

/// One test at a time: each boots guests, and `common::reference_images`
/// takes the shared state directory's lock (two at once: `state_busy`).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn ok(what: &str, out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{what}");
}

/// Every file and directory under `dir` loses its write bits, as in the store.
fn read_only(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            read_only(&e.path());
        }
        let mode = e.metadata().unwrap().permissions().mode() & 0o555;
        fs::set_permissions(e.path(), fs::Permissions::from_mode(mode)).unwrap();
    }
    let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o555;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).unwrap();
}

fn ssh_port(state: &Path, cluster: &str) -> u64 {
    let out = common::run(state, &["--cluster", cluster, "status", "--json"]);
    ok("status", &out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nodes"]["solo"]["ssh_port"]
        .as_u64()
        .or_else(|| v["nodes"][0]["ssh_port"].as_u64())
        .unwrap_or_else(|| panic!("no ssh_port in {v}"))
}

#[test]
fn one_snapshot_restores_twice_side_by_side_from_a_read_only_directory() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (_, cluster) = one_node(tmp.path());
    let c = cluster.to_str().unwrap().to_string();
    let saved_in = tmp.path().join("saved-in");
    let (b, d) = (tmp.path().join("b"), tmp.path().join("d"));
    let _stop = StopOnDrop(
        vec![saved_in.clone(), b.clone(), d.clone()],
        cluster.clone(),
    );

    let t = std::time::Instant::now();
    ok(
        "cold start",
        &common::run(&saved_in, &["--cluster", &c, "start", "--accel", "tcg"]),
    );
    eprintln!("cold boot to ready: {:.1} s", t.elapsed().as_secs_f64());
    let old_port = ssh_port(&saved_in, &c);
    ok(
        "save",
        &common::run(
            &saved_in,
            &["--cluster", &c, "snapshot", "save", "ready", "--stop"],
        ),
    );
    // The snapshot moves away from the directory it was saved in, which
    // goes; what is left is read-only, as a store path is.
    // (The one-node cluster's state lives in the `-one-node` sibling.)
    let store = tmp.path().join("store-ready");
    let saved_dir = tmp.path().join("saved-in-one-node");
    fs::rename(saved_dir.join("snapshots/ready"), &store).unwrap();
    fs::remove_dir_all(&saved_dir).unwrap();
    read_only(&store);
    let snap = store.to_str().unwrap().to_string();

    // Two restores of it at once, each in its own directory.
    let t = std::time::Instant::now();
    let runs: Vec<_> = [&b, &d]
        .map(|state| {
            let (c, snap, state) = (c.clone(), snap.clone(), state.clone());
            std::thread::spawn(move || {
                let args = ["--cluster", &c, "start", "--from-snapshot", &snap];
                common::run(&state, &args)
            })
        })
        .into_iter()
        .collect();
    for r in runs {
        ok("restore", &r.join().unwrap());
    }
    eprintln!(
        "two restores side by side to ready: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let ports = [ssh_port(&b, &c), ssh_port(&d, &c)];
    assert_ne!(ports[0], ports[1], "each restore has its own host ports");
    eprintln!("ssh ports: saved {old_port}, restored {ports:?}");
    for state in [&b, &d] {
        let out = common::run(
            state,
            &[
                "--cluster",
                &c,
                "ssh",
                "solo",
                "ip -4 -o addr; touch /root/mine",
            ],
        );
        ok("exec", &out);
        // The guest keeps its own address on the fabric.
        assert!(String::from_utf8_lossy(&out.stdout).contains("10.78.0.10/"));
    }
    // Each restore writes its own disk: a file made in one is not in the other.
    ok(
        "own disk",
        &common::run(
            &b,
            &["--cluster", &c, "ssh", "solo", "rm /root/mine && sync"],
        ),
    );
    ok(
        "other disk untouched",
        &common::run(&d, &["--cluster", &c, "ssh", "solo", "test -e /root/mine"]),
    );
    for state in [&b, &d] {
        ok(
            "stop",
            &common::run(state, &["--cluster", &c, "stop", "--grace", "5"]),
        );
    }
    let needle = tmp.path().to_str().unwrap();
    assert_eq!(common::qemu_pids_mentioning(needle), Vec::<i32>::new());
    assert_eq!(
        common::pids_mentioning("fabric-switch", needle),
        Vec::<i32>::new()
    );

    // A directory without a manifest is refused before anything starts.
    let out = common::run(&b, &["--cluster", &c, "start", "--from-snapshot", needle]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no manifest.json"));
}

/// `run` with the hermetic arguments of a Nix builder (images and host
/// tools outside the store, allowed as impure).
fn hermetic(state: &Path, cluster: &Path, images: &Path, out: &Path, extra: &[&str]) -> Output {
    hermetic_lane(state, cluster, images, out, LAYERED, extra)
}

const LAYERED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/layered.toml");

fn hermetic_lane(
    state: &Path,
    cluster: &Path,
    images: &Path,
    out: &Path,
    lane: &str,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "--cluster",
        cluster.to_str().unwrap(),
        "run",
        "--out",
        out.to_str().unwrap(),
        "--image-dir",
        images.to_str().unwrap(),
        "--accel",
        "tcg",
        "--lane-file",
        lane,
        "--allow-impure",
        "/",
    ];
    args.extend_from_slice(extra);
    common::run(state, &args)
}

/// A one-node cluster in `tmp` on the shared image: its image directory
/// and its definition.
fn one_node(tmp: &Path) -> (PathBuf, PathBuf) {
    let images = tmp.join("images");
    common::image_dir_with_cmdline(&images, "");
    let cluster = common::one_node_cluster(tmp, &images);
    (images, cluster)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// The ready output, two layers run from it at once (one crashes its node
/// on purpose), a third after, and the lane assembled from the three.
#[test]
fn layers_run_from_one_ready_output_and_assemble_into_the_lane() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (images, cluster) = one_node(tmp.path());
    let ready = tmp.path().join("ready");
    let t = std::time::Instant::now();
    let out = hermetic(
        &tmp.path().join("s-ready"),
        &cluster,
        &images,
        &ready,
        &["--ready"],
    );
    ok("run --ready", &out);
    eprintln!("ready output: {:.1} s", t.elapsed().as_secs_f64());
    for f in [
        "manifest.json",
        "boot.json",
        "consoles/solo.log",
        "solo/memory.bin.zst",
        "ssh/known_hosts",
    ] {
        assert!(ready.join(f).is_file(), "{f} in the ready output");
    }
    read_only(&ready);

    // A fresh-* lane restores the ready output instead of booting.
    let lane_file = tmp.path().join("hostname.toml");
    fs::write(
        &lane_file,
        "[lane]\nname = \"hostname\"\n[[layer]]\nname = \"boot\"\n[[layer.check]]\n\
         name = \"hostname\"\nkind = \"exec\"\ntargets = \"all\"\ncommand = \"hostname\"\n\
         stdout_equals = \"solo\"\n",
    )
    .unwrap();
    let work = tmp.path().join("fresh-work");
    let o = common::run(
        &tmp.path().join("s-fresh"),
        &[
            "--cluster",
            cluster.to_str().unwrap(),
            "fresh-smoke",
            "--accel",
            "tcg",
            "--from-snapshot",
            ready.to_str().unwrap(),
            "--lane-file",
            lane_file.to_str().unwrap(),
            "--artifacts",
            work.to_str().unwrap(),
        ],
    );
    ok("fresh-smoke --from-snapshot <ready output>", &o);
    let r = json(&work.join("hostname/latest/result.json"));
    assert_eq!(r["boot"]["mode"], "warm", "{}", r["boot"]);
    assert_eq!(common::check(&r, "hostname@solo")["outcome"], "pass");

    let layer = |name: &'static str| {
        let (c, i, r) = (cluster.clone(), images.clone(), ready.clone());
        let (state, out) = (tmp.path().join(format!("s-{name}")), tmp.path().join(name));
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            let o = hermetic(
                &state,
                &c,
                &i,
                &out,
                &[
                    "--from-ready",
                    r.to_str().unwrap(),
                    "--layer",
                    name,
                    "--keep-failed",
                ],
            );
            eprintln!("layer {name}: {:.1} s", t.elapsed().as_secs_f64());
            (o, out)
        })
    };
    let (crash, still) = (layer("crash"), layer("still-up"));
    let (crash, still) = (crash.join().unwrap(), still.join().unwrap());
    let boot = layer("boot").join().unwrap();
    for (o, _) in [&crash, &still, &boot] {
        ok("a layer keeps its output (--keep-failed)", o);
    }
    let r = json(&crash.1.join("result.json"));
    // Its node is gone: an error (node_gone), with the panic in the evidence.
    assert_eq!(r["status"], "error", "{}", r["layers"]);
    assert_eq!(r["error_kind"], "node_gone");
    assert_eq!(r["boot"]["mode"], "warm");
    assert!(crash.1.join("nix-support/failed").exists());
    assert_eq!(json(&still.1.join("result.json"))["status"], "pass");
    assert_eq!(json(&boot.1.join("result.json"))["status"], "pass");

    // An unknown layer is refused before anything starts.
    let out = hermetic(
        &tmp.path().join("s-x"),
        &cluster,
        &images,
        &tmp.path().join("x"),
        &["--from-ready", ready.to_str().unwrap(), "--layer", "nope"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("its layers: boot, crash, still-up"));

    let lane = tmp.path().join("lane");
    let dirs = [&boot.1, &crash.1, &still.1].map(|d| d.to_str().unwrap().to_string());
    let mut args = vec!["run", "--out", lane.to_str().unwrap()];
    for d in &dirs {
        args.extend(["--assemble", d.as_str()]);
    }
    let out = common::run(&tmp.path().join("s-lane"), &args);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the lane ends in error: one layer did"
    );
    let r = json(&lane.join("result.json"));
    assert_eq!(
        common::layer_names(&r),
        [
            "boot",
            "health:boot",
            "crash",
            "health:crash",
            "still-up",
            "health:still-up"
        ]
    );
    assert_eq!(common::check(&r, "hostname@solo")["outcome"], "pass");
    assert_eq!(common::check(&r, "panic@solo")["outcome"], "fail");
    let assemble = r["steps"].as_array().unwrap().last().unwrap();
    assert!(
        assemble["message"]
            .as_str()
            .unwrap()
            .contains("first failed: crash"),
        "{assemble}"
    );
    assert!(lane.join("junit.xml").is_file() && lane.join("report.html").is_file());
    assert!(lane.join("layers/crash/nodes/solo/vm.log").is_file());
    assert!(lane.join("nix-support/hydra-build-products").is_file());
    let needle = tmp.path().to_str().unwrap();
    assert_eq!(common::qemu_pids_mentioning(needle), Vec::<i32>::new());
}

/// `after`: a layer continues from an earlier layer's saved end state, and
/// a layer without `after` still starts from the ready cluster. Run as the
/// graph outside Nix (`run --jobs 2`), which wires it as mkLayeredCheck
/// does (`--save-end`, then `--from-ready <out>/end`).
#[test]
fn a_layer_after_another_continues_from_its_end_state_in_a_graph_of_two_jobs() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (images, cluster) = one_node(tmp.path());
    let lane = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/layered-after.toml"
    );
    let (state, out) = (tmp.path().join("s"), tmp.path().join("lane"));
    let o = hermetic_lane(&state, &cluster, &images, &out, lane, &["--jobs", "0"]);
    assert_eq!(o.status.code(), Some(2), "--jobs 0 is refused");

    let t = std::time::Instant::now();
    let o = hermetic_lane(&state, &cluster, &images, &out, lane, &["--jobs", "2"]);
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    eprintln!("run --jobs 2: {:.1} s\n{log}", t.elapsed().as_secs_f64());
    ok("run --jobs 2", &o);
    let r = json(&out.join("result.json"));
    assert_eq!(r["status"], "pass", "{}", r["layers"]);
    assert_eq!(
        common::layer_names(&r),
        [
            "mark",
            "health:mark",
            "continued",
            "health:continued",
            "fresh",
            "health:fresh"
        ]
    );
    for id in ["leave-a-mark@solo", "mark-is-there@solo", "no-mark@solo"] {
        assert_eq!(common::check(&r, id)["outcome"], "pass", "{id}");
    }
    // Two at a time: `fresh` started beside `mark`, `continued` after it.
    let at = |line: &str| {
        log.find(line)
            .unwrap_or_else(|| panic!("{line:?} not in {log}"))
    };
    assert!(at("graph: layer fresh started") < at("graph: layer mark pass"));
    assert!(at("graph: layer mark pass") < at("graph: layer continued started"));
    assert!(out.join("jobs/continued.log").is_file());
    assert!(
        !tmp.path().join("lane.parts").exists(),
        "the parts are removed"
    );
    let needle = tmp.path().to_str().unwrap();
    assert_eq!(common::qemu_pids_mentioning(needle), Vec::<i32>::new());
}

/// Waits up to `within` for `cond`, polling every 500 ms; returns the
/// seconds it took, or panics with `what` at the deadline.
fn wait_for(what: &str, within: std::time::Duration, cond: impl Fn() -> bool) -> f64 {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!("{what}: after {secs:.1} s");
    secs
}

/// Ctrl-C during `run --jobs 2`: the one signal is passed on to the layer
/// still running (its process group is its own, so the terminal's signal
/// would reach the graph only), which stops with its evidence; the graph
/// assembles what the layers left with status `interrupted`, exits 130,
/// and leaves nothing running. Each layer got what was left of the graph's
/// `--timeout` as its own.
#[test]
fn ctrl_c_during_a_graph_of_two_jobs_stops_every_layer_with_its_evidence() {
    use nix::sys::signal::{Signal, kill};
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let (images, cluster) = one_node(tmp.path());
    let lane = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/layered-stopped.toml"
    );
    let (state, out) = (tmp.path().join("s"), tmp.path().join("lane"));
    let log = tmp.path().join("graph.log");
    let mut graph = common::bin()
        .arg("--state-dir")
        .arg(&state)
        .args(["--timeout", "1800", "--cluster", cluster.to_str().unwrap()])
        .args([
            "run",
            "--jobs",
            "2",
            "--accel",
            "tcg",
            "--allow-impure",
            "/",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--image-dir")
        .arg(&images)
        .args(["--lane-file", lane])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let long_log = tmp.path().join("lane.parts/logs/long.log");
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    wait_for(
        "quick passed and long's check running",
        std::time::Duration::from_secs(900),
        || {
            read(&log).contains("graph: layer quick pass")
                && read(&long_log).contains("sleeper@solo: running")
        },
    );
    let needle = tmp.path().to_str().unwrap();
    let long: Vec<i32> = common::pids_mentioning("photon-cluster", needle)
        .into_iter()
        .filter(|p| {
            let cmd = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("\0long\0")
        })
        .collect();
    assert_eq!(long.len(), 1, "the long layer's process: {long:?}");
    let cmd = fs::read(format!("/proc/{}/cmdline", long[0])).unwrap();
    let args: Vec<String> = String::from_utf8_lossy(&cmd)
        .split('\0')
        .map(str::to_string)
        .collect();
    let at = args
        .iter()
        .position(|a| a == "--timeout")
        .expect("--timeout");
    let secs: u64 = args[at + 1].parse().unwrap();
    assert!((1..1800).contains(&secs), "the layer's --timeout {secs}");

    let t = std::time::Instant::now();
    kill(
        nix::unistd::Pid::from_raw(graph.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    let status = graph.wait().unwrap();
    let text = read(&log);
    eprintln!(
        "the graph stopped {:.1} s after Ctrl-C:\n{text}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(status.code(), Some(130), "{text}");
    let r = json(&out.join("result.json"));
    assert_eq!(r["status"], "interrupted", "{}", r["layers"]);
    assert_eq!(common::check(&r, "quick@solo")["outcome"], "pass");
    let long = json(&out.join("layers/long/result.json"));
    assert_eq!(long["status"], "interrupted", "{long}");
    assert!(out.join("layers/long/nodes/solo/vm.log").is_file());
    assert!(out.join("jobs/long.log").is_file());
    assert_eq!(common::qemu_pids_mentioning(needle), Vec::<i32>::new());
    assert_eq!(
        common::pids_mentioning("photon-cluster", needle),
        Vec::<i32>::new()
    );
}
