//! End to end: real QEMU guests of the reference cluster, as scenarios
//! `s01`..`s15` that run in the order of their names and share one booted
//! cluster. Boot is the expensive part, so there is one cold boot in all:
//! the README's `fresh-smoke` (s02), which saves the ready cluster as the
//! `default` snapshot (`--save-ready`) before its smoke. Every later
//! scenario (the CLI assertions, the lanes, the broken-on-purpose smoke)
//! restores that snapshot when it needs a cluster (`ready_cluster`), as
//! does a scenario that runs alone or follows one that failed.
//!
//! Images are built (or found cached) in the shared test state directory.

mod common;

use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Ctrl-C during `start` tears every QEMU down and exits 130.
fn interrupt_during_start_leaves_nothing(state: &Path) {
    let mut child = common::bin()
        .arg("--state-dir")
        .arg(state)
        .arg("start")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let needle = state.to_str().unwrap();
    let t = Instant::now();
    while common::qemu_pids_mentioning(needle).len() < 6 {
        assert!(t.elapsed() < Duration::from_secs(120), "QEMU never started");
        assert!(child.try_wait().unwrap().is_none(), "start exited early");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "start ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "interrupted start exits 130");
    assert_eq!(
        common::qemu_pids_mentioning(needle),
        Vec::<i32>::new(),
        "no QEMU may survive an interrupted start"
    );
    assert!(!state.join("cluster.json").exists());
}

/// A SIGKILLed `start` cannot tear down; the next command on the state
/// directory (any command: here `status`) reaps its QEMUs and says so.
fn sigkill_during_start_is_reaped_by_the_next_command(state: &Path) {
    let mut child = common::bin()
        .arg("--state-dir")
        .arg(state)
        .arg("start")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let needle = state.to_str().unwrap();
    let t = Instant::now();
    while common::qemu_pids_mentioning(needle).len() < 6 {
        assert!(t.elapsed() < Duration::from_secs(120), "QEMU never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    // While `start` runs, `status` answers at once that it is starting.
    let t = Instant::now();
    let out = common::run(state, &["status"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("is starting"), "{}", stdout(&out));
    // "At once" against a boot of minutes: it does not wait for `start`.
    // The bound is loose because a busy host can stall any process for
    // seconds; a `status` that waited for the boot would take minutes.
    eprintln!("status during start: {:.1} s", t.elapsed().as_secs_f64());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "status took {:?}",
        t.elapsed()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        common::qemu_pids_mentioning(needle).len(),
        6,
        "SIGKILL leaves them"
    );
    let out = common::run(state, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reaped 6 QEMU"), "{err}");
    assert_eq!(out.status.code(), Some(2), "no cluster is left running");
    assert_eq!(common::qemu_pids_mentioning(needle), Vec::<i32>::new());
    let t = Instant::now();
    while !common::pids_mentioning("fabric-switch", needle).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the fabric switch outlived its cluster"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn artifacts_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-work")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// Stops redis on node03 and runs smoke: it must fail at exactly the boot
/// check of node03, with the evidence in result.json, junit.xml and the report.
fn smoke_fails_at_the_broken_unit(state: &Path) {
    let out = common::run(state, &["ssh", "node03", "systemctl stop redis-server"]);
    assert_eq!(out.status.code(), Some(0));
    let root = artifacts_dir().join("broken");
    let out = common::run(state, &["smoke", "--artifacts", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "a failed check exits 1");
    let dir = root.join("smoke/latest");
    let result = read_json(&dir.join("result.json"));
    assert_eq!(result["status"], "fail");
    assert_eq!(result["exit_code"], 1);
    let failed: Vec<&Value> = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["checks"].as_array().unwrap())
        .filter(|c| c["outcome"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "exactly one failed check: {failed:?}");
    assert_eq!(failed[0]["id"], "units@node03");
    assert_eq!(
        failed[0]["evidence"]["units"]["redis-server.service"], "inactive",
        "{}",
        failed[0]
    );
    assert!(
        failed[0]["message"]
            .as_str()
            .unwrap()
            .contains("redis-server.service")
    );
    let layers = result["layers"].as_array().unwrap();
    assert_eq!(layers[1]["name"], "boot");
    assert_eq!(layers[1]["outcome"], "fail");
    assert_eq!(
        layers[2]["outcome"], "skipped",
        "layers after a failed one are skipped"
    );

    let junit = std::fs::read_to_string(dir.join("junit.xml")).unwrap();
    assert!(junit.contains(r#"failures="1""#), "{junit}");
    let case = junit
        .find(r#"<testcase name="units@node03""#)
        .expect("test case");
    let failure = junit[case..].find("<failure").expect("failure element");
    let next_case = junit[case + 1..]
        .find("<testcase")
        .map(|i| i + case + 1)
        .unwrap_or(junit.len());
    assert!(
        case + failure < next_case,
        "the failure belongs to units@node03"
    );
    assert!(junit[case..next_case].contains("redis-server.service is inactive"));

    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("units@node03"));
    assert!(
        dir.join("nodes/node03/journal/redis-server.service.log")
            .is_file()
    );
    // What a person sees: the failure and its journal above the fold in a
    // real browser, the timeline with each node's boot phases.
    let seen = common::browser::assert_readable(&dir, &screenshots(), "e2e-failing");
    assert_eq!(seen["failures"][0]["name"], "units@node03");
    boot_phases_in_order(&result);
    let log = std::fs::read_to_string(dir.join("driver.log")).unwrap();
    assert!(
        log.contains("DEBUG") && log.contains("units@node03"),
        "driver.log keeps the debug log of the run"
    );
    common::run(state, &["ssh", "node03", "systemctl start redis-server"]);
}

fn screenshots() -> std::path::PathBuf {
    artifacts_dir().join("screenshots")
}

/// Each node's boot phases were seen in order: launched, kernel banner,
/// sshd, dependencies, ready. A cluster restored from a snapshot (a
/// scenario after one that failed, or run alone) shows no kernel banner:
/// its guests resume, they do not boot; its other phases are still in order.
fn boot_phases_in_order(result: &Value) {
    if result["boot"]["mode"] == "warm" {
        for (name, n) in result["nodes"].as_object().unwrap() {
            let p = &n["phases"];
            let at = |k: &str| {
                p[k].as_f64()
                    .unwrap_or_else(|| panic!("{name}: no {k}: {p}"))
            };
            assert!(at("launched_s") < at("sshd_s"), "{name}: {p}");
            assert!(at("sshd_s") <= at("units_s"), "{name}: {p}");
        }
        return;
    }
    for (name, n) in result["nodes"].as_object().unwrap() {
        let p = &n["phases"];
        let at = |k: &str| {
            p[k].as_f64()
                .unwrap_or_else(|| panic!("{name}: no {k}: {p}"))
        };
        assert!(at("launched_s") < at("kernel_s"), "{name}: {p}");
        assert!(at("kernel_s") < at("sshd_s"), "{name}: {p}");
        assert!(at("sshd_s") <= at("units_s"), "{name}: {p}");
        assert!(at("units_s") <= at("ready_s"), "{name}: {p}");
        assert_eq!(n["ready_after_s"], p["ready_s"]);
    }
}

/// Runs a lane command on the running cluster with `--json`; the document
/// on stdout is its result.json. Returns it and the directory.
fn lane(state: &Path, command: &str, lane: &str) -> (Value, std::path::PathBuf) {
    let root = artifacts_dir().join("lanes");
    // bench-storage runs on reference-storage unless told otherwise.
    let out = common::run(
        state,
        &[
            "--profile",
            "reference",
            command,
            "--json",
            "--artifacts",
            root.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{command}");
    let dir = root.join(lane).join("latest");
    let result = read_json(&dir.join("result.json"));
    let printed: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(printed, result, "{command} --json prints its result.json");
    (result, dir)
}

/// `smoke` with the lane `tests/fixtures/<name>.toml` (whose lane is called
/// `<name>`): its exit code and result.json.
fn fixture_lane(state: &Path, name: &str) -> (Option<i32>, Value) {
    let root = artifacts_dir().join("lanes");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.toml"));
    let out = common::run(
        state,
        &[
            "smoke",
            "--lane-file",
            fixture.to_str().unwrap(),
            "--artifacts",
            root.to_str().unwrap(),
        ],
    );
    let result = read_json(&root.join(name).join("latest/result.json"));
    (out.status.code(), result)
}

/// Under TCG a layer that needs nested KVM is degraded; on KVM it passes.
fn pass_or_tcg_degraded(result: &Value, layer: &str) {
    let l = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == layer)
        .unwrap();
    let want = if result["accel"]["used"] == "kvm" {
        "pass"
    } else {
        "degraded"
    };
    assert_eq!(l["outcome"], want, "{layer}: {l}");
}

/// The other lanes on the same booted cluster: the provider and VM-hosting
/// proof with its artifact subtrees, the matrix, the storage benchmark, and
/// a migration whose volume is not shared, which must fail.
/// The ids of a procedure check's steps, in order (src/check/procedure.rs).
fn step_ids(check: &Value) -> Vec<&str> {
    let steps = check["evidence"]["steps"].as_array().unwrap();
    steps.iter().map(|s| s["id"].as_str().unwrap()).collect()
}

/// The proof lane: DNS, the load balancer drain, the VM live migration on
/// a shared volume, and every provider lifecycle's evidence.
fn proof_lane(state: &Path) {
    let (result, dir) = lane(
        state,
        "provider-vm-reality-proof",
        "provider-vm-reality-proof",
    );
    pass_or_tcg_degraded(&result, "vm-hosting");
    assert_eq!(result["layers"][1]["name"], "network-provider");
    assert_eq!(result["layers"][1]["outcome"], "pass");
    let drain = read_json(&dir.join("network-provider/fiberlb-drain.json"));
    assert_eq!(drain["outcome"], "pass", "{drain}");
    let drained = drain["evidence"]["drained"]["rounds"].as_array().unwrap();
    assert!(drained.last().unwrap().get("node04").is_none(), "{drain}");
    assert!(
        dir.join("network-provider/dns-workload-node01.json")
            .is_file()
    );
    assert!(dir.join("network-provider/journal-node01.log").is_file());
    let migration = read_json(&dir.join("vm-hosting/migration.json"));
    let watch = &migration["evidence"]["watch"];
    let (last, first) = (
        watch["source_last_letter"].as_str().unwrap().as_bytes()[0],
        watch["destination_first_letter"]
            .as_str()
            .unwrap()
            .as_bytes()[0],
    );
    assert_eq!(first, if last == b'Z' { b'A' } else { last + 1 }, "{watch}");
    assert_eq!(
        migration["evidence"]["migration"]["stats"]["status"],
        "completed"
    );
    assert!(
        migration["evidence"]["volume_after"]["read"]
            .as_str()
            .unwrap()
            .contains("read 65536/65536")
    );
    // The migration is a procedure: its steps by id (src/check/vm_migration.rs).
    let ids = step_ids(&migration);
    for id in [
        "prepare",
        "port-create",
        "port-plug",
        "launch-source",
        "boot",
        "volume-write",
        "launch-destination",
        "port-before",
        "migrate",
        "migration-completed",
        "port-activated",
        "port-finalized",
        "resume",
        "volume-read",
        "restarted",
        "stop",
        "port-unbound",
        "port-left",
    ] {
        assert!(
            ids.contains(&id),
            "migration step {id} missing from {ids:?}"
        );
    }
    assert_eq!(
        result["artifacts"]["check:vm-live-migration@node04"],
        "vm-hosting/migration.json"
    );
    provider_lifecycles(&dir, &migration);
}

/// The matrix lane: every composed layer passes (nested ones pass or are
/// degraded under TCG) and the faults layer keeps its evidence.
fn matrix_lane(state: &Path) {
    let (result, dir) = lane(state, "matrix", "matrix");
    for layer in [
        "boot",
        "network",
        "tenant-network",
        "kubernetes-style",
        "state",
        "gateway",
    ] {
        let l = result["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == layer);
        assert_eq!(l.unwrap()["outcome"], "pass", "{layer}");
    }
    pass_or_tcg_degraded(&result, "hosting");
    matrix_faults_layer(&result, &dir);
}

/// The reference profile's storage bench: qemu-img bench between workers.
fn bench_storage_lane(state: &Path) {
    let (result, dir) = lane(state, "bench-storage", "bench-storage");
    let bench = common::check(&result, "remote-vs-local-export@node04");
    assert_eq!(bench["outcome"], "pass", "{bench}");
    for mode in ["read", "write"] {
        let ratio = bench["evidence"][mode]["ratio"].as_f64().unwrap();
        assert!(ratio > 0.0, "{mode}: {bench}");
        assert_eq!(
            bench["evidence"][mode]["subject_mb_s"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
    assert!(dir.join("bench/storage-node04.json").is_file());
}

/// Lanes broken on purpose: an ACL left blocking, Ctrl-C during the tenant
/// network's lifecycle, and a migration onto a volume that is not shared.
fn lanes_broken_on_purpose(state: &Path) {
    // Zero the destination's own volume where the check writes its pattern,
    // so that only a really shared volume could hold it.
    let out = common::run(
        state,
        &[
            "ssh",
            "node05",
            "qemu-io -f raw -c 'write -z 512k 64k' nbd://127.0.0.1:10809/vol0",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    acl_left_blocking_fails(state);
    interrupt_during_tenant_network_tears_down(state);
    let (code, result) = fixture_lane(state, "unshared-volume");
    assert_eq!(
        code,
        Some(1),
        "an unshared volume fails the migration check"
    );
    let c = common::check(&result, "vm-migration@node04");
    assert_eq!(c["outcome"], "fail");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("does not hold the source's write"),
        "{c}"
    );
}

/// The proof lane's runtime lifecycles: the OVN tenant network, the DNS
/// record, the published listener, the VM's port across the migration and
/// its deletion, and the Kubernetes-style bundle.
fn provider_lifecycles(dir: &Path, migration: &Value) {
    let net = read_json(&dir.join("network-provider/prismnet-tenant-network.json"));
    assert_eq!(net["outcome"], "pass", "{net}");
    let steps = net["evidence"]["steps"].as_array().unwrap();
    let step = |id: &str| {
        steps
            .iter()
            .rfind(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no step {id:?}: {net}"))
    };
    assert!(
        step("get-router")["output"]
            .as_str()
            .unwrap()
            .contains("tenant-a-vpc")
    );
    assert!(
        step("get-security-group")["output"]
            .as_str()
            .unwrap()
            .contains("allow-related")
    );
    assert_eq!(step("traffic-before")["exit"], 0);
    assert!(
        step("traffic-blocked")["output"]
            .as_str()
            .unwrap()
            .contains("100% packet loss")
    );
    assert_eq!(step("traffic-restored")["exit"], 0);
    assert_eq!(step("nothing-left")["output"], "");

    let dns = read_json(&dir.join("network-provider/flashdns-runtime-record.json"));
    assert_eq!(dns["outcome"], "pass", "{dns}");
    assert_eq!(
        dns["evidence"]["add"]["response"]["tsig"], "verified",
        "{dns}"
    );
    for n in ["node01", "node02", "node03"] {
        assert!(dns["evidence"]["propagation"][n]["ms"].is_number(), "{dns}");
        assert!(
            dns["evidence"]["removal_propagation"][n]["ms"].is_number(),
            "{dns}"
        );
    }

    let lb = read_json(&dir.join("network-provider/fiberlb-runtime-listener.json"));
    assert_eq!(lb["outcome"], "pass", "{lb}");
    for n in ["node01", "node02", "node03"] {
        assert!(
            lb["evidence"]["traffic"][n]["answer"]
                .as_str()
                .unwrap()
                .contains("photon web backend")
        );
        assert!(lb["evidence"]["closed"][n]["seconds"].is_number(), "{lb}");
    }
    // The lifecycle's steps, by id (src/check/procedure.rs), not by prose.
    let ids = step_ids(&lb);
    for id in [
        "closed-before",
        "publish",
        "traffic",
        "runtime-view",
        "retract",
        "closed-after",
    ] {
        assert!(ids.contains(&id), "step {id} missing from {ids:?}");
    }

    let port = &migration["evidence"]["port"];
    assert_eq!(
        port["before_migration"]["binding"]["chassis"],
        serde_json::json!(["node04"]),
        "{port}"
    );
    assert!(
        port["after_migration"]["binding"]["options"]
            .as_str()
            .unwrap()
            .contains("additional-chassis-activated=node05"),
        "{port}"
    );
    assert_eq!(
        port["finalized"]["binding"]["chassis"],
        serde_json::json!(["node05"]),
        "{port}"
    );
    assert_eq!(port["deleted"]["left_in_databases"], "", "{port}");

    let kube = read_json(&dir.join("vm-hosting/k8s-bundle.json"));
    assert_eq!(kube["outcome"], "pass", "{kube}");
    assert!(
        kube["evidence"]["service_v2"]["answer"]
            .as_str()
            .unwrap()
            .contains("v2")
    );
}

/// An ACL left blocking: the tenant network check fails at its traffic
/// step with the pings as evidence, and removes what it made (the stray
/// ACL's switch included).
fn acl_left_blocking_fails(state: &Path) {
    let (code, result) = fixture_lane(state, "acl-left-blocking");
    assert_eq!(code, Some(1), "an ACL left blocking fails the lane");
    let c = common::check(&result, "tenant-network");
    assert_eq!(c["outcome"], "fail", "{c}");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("traffic before the ACL change"),
        "{c}"
    );
    let pings: Vec<&Value> = c["evidence"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["id"] == "traffic-before")
        .collect();
    assert!(
        pings
            .iter()
            .all(|p| p["output"].as_str().unwrap().contains("100% packet loss"))
    );
    // The check removed what it made (the failed layer skips any later one,
    // so this is asked here, not in the fixture).
    let out = common::run(
        state,
        &[
            "ssh",
            "node01",
            "ovn-nbctl --bare --columns=name find logical_switch name=tenant-b; \
             ovn-nbctl --bare --columns=name find port_group name=tenant_b_sg; \
             ovn-sbctl --bare --columns=logical_port find port_binding | grep tenant-b; true",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "left behind"
    );
}

/// SIGINT while `tenant_network` runs (once its logical switch exists):
/// the run ends within seconds plus the check's teardown, exits 130, marks
/// result.json interrupted, and nothing the check made is left in OVN or on
/// the workers.
fn interrupt_during_tenant_network_tears_down(state: &Path) {
    let root = artifacts_dir().join("lanes");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tenant-network-interrupted.toml");
    let mut child = common::bin()
        .arg("--state-dir")
        .arg(state)
        .args(["smoke", "--lane-file"])
        .arg(&fixture)
        .arg("--artifacts")
        .arg(&root)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let made =
        "ovn-nbctl --bare --columns=name find logical_switch name=tenant-c | grep -q tenant-c";
    let t = Instant::now();
    loop {
        let out = common::run(state, &["ssh", "node01", made]);
        if out.status.code() == Some(0) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the lane ended before its switch existed"
        );
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the tenant switch never appeared"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "tenant_network ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "SIGINT during tenant_network: the driver exited after {secs:.1} s (teardown included)"
    );
    assert_eq!(status.code(), Some(130), "an interrupted lane exits 130");
    let result = read_json(&root.join("tenant-network-interrupted/latest/result.json"));
    assert_eq!(result["status"], "interrupted", "{result}");
    // The teardown's own steps are in the evidence; the time spent before
    // them is the interrupt's latency.
    let c = common::check(&result, "tenant-network");
    let steps = c["evidence"]["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(
            |s| s["id"].as_str().unwrap().starts_with("teardown") && s["outcome"] == "teardown"
        ),
        "{c}"
    );
    assert!(
        secs < 60.0,
        "5 s plus a teardown of two commands took {secs:.1} s"
    );
    let out = common::run(
        state,
        &[
            "ssh",
            "node01",
            "ovn-nbctl --bare --columns=name find logical_switch name=tenant-c; \
             ovn-nbctl --bare --columns=name find logical_router name=tenant-c-vpc; \
             ovn-nbctl --bare --columns=name find port_group name=tenant_c_sg; \
             ovn-sbctl --bare --columns=logical_port find port_binding | grep tenant-c; true",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "left behind in OVN"
    );
    for node in ["node04", "node05"] {
        let out = common::run(
            state,
            &[
                "ssh",
                node,
                "ip netns list | grep tenant-c; ovs-vsctl list-ports br-int | grep tenant-c; true",
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "",
            "left behind on {node}"
        );
    }
}

/// The matrix's faults layer: etcd under a partition and a crash loses no
/// acknowledged write; the load balancer routes around a cut backend; the
/// pcap and the history are kept, and result.json has the switch counters.
fn matrix_faults_layer(result: &Value, dir: &Path) {
    let etcd = common::check(result, "etcd-partition-and-crash");
    assert_eq!(etcd["outcome"], "pass", "{etcd}");
    let ev = &etcd["evidence"];
    eprintln!("etcd under faults: {}", etcd["message"]);
    assert_eq!(ev["tally"]["lost"], 0, "{ev}");
    assert!(ev["tally"]["acknowledged"].as_u64().unwrap() > 10, "{ev}");
    assert_eq!(
        ev["partition"]["isolated_member"]["linearizable_read_refused"],
        true
    );
    assert!(ev["partition"]["majority_acknowledged"].as_u64().unwrap() > 0);
    assert!(ev["partition"]["isolated_caught_up_s"].is_number(), "{ev}");
    assert!(ev["crash"]["caught_up_s"].is_number(), "{ev}");
    let history = std::fs::read_to_string(dir.join("faults/etcd-history.jsonl")).unwrap();
    assert!(history.lines().count() as u64 >= ev["tally"]["acknowledged"].as_u64().unwrap());
    assert!(history.contains("\"phase\":\"partitioned\""));
    let pcap = std::fs::metadata(dir.join("faults/etcd.pcap")).unwrap();
    assert!(pcap.len() > 1000, "the pcap holds frames");
    let redis = common::check(result, "redis-primary-partitioned");
    eprintln!("redis under a partition: {}", redis["message"]);
    assert_ne!(redis["outcome"], "fail", "{redis}");
    if redis["outcome"] == "degraded" {
        assert!(
            redis["message"]
                .as_str()
                .unwrap()
                .contains("acknowledged-then-lost")
        );
    }
    for r in ["node02", "node03"] {
        assert!(
            redis["evidence"]["converged_after_heal_s"][r].is_number(),
            "{redis}"
        );
    }
    assert!(dir.join("faults/redis-history.jsonl").is_file());
    let lb = common::check(result, "lb-backend-cut");
    eprintln!("load balancer under a cut: {}", lb["message"]);
    assert_eq!(lb["outcome"], "pass", "{lb}");
    let ports = result["fabric"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 6);
    assert!(
        ports
            .iter()
            .any(|p| p["dropped_partition"].as_u64().unwrap() > 0)
    );
    let faults = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "faults");
    assert!(
        faults.unwrap().get("restored").is_none(),
        "the scenarios healed themselves"
    );
}

/// `photon-cluster fault ...` by hand: refusals change nothing (exit 2); a
/// partition cuts traffic between two guests and a heal restores it; and a
/// checker broken on purpose (one member's reads discarded) reports lost
/// writes by key.
fn faults_by_hand(state: &Path) {
    for bad in [
        vec!["fault", "partition", "node99", "node01"],
        vec!["fault", "link", "node05", "--loss", "130%"],
        vec!["fault", "crash", "node99"],
        vec!["restart", "node99"],
    ] {
        let out = common::run(state, &bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
    let ping = "ping -c 1 -W 2 10.77.0.15";
    let out = common::run(state, &["fault", "partition", "node04", "node05"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("node04 | node05"));
    assert_eq!(
        common::run(state, &["ssh", "node04", ping]).status.code(),
        Some(1)
    );
    let out = common::run(state, &["fault", "status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["partition"].is_array(), "{status}");
    // A heal is done when traffic flows: the driver waits for it and says
    // how long it took; the test still waits with a deadline of its own.
    let out = common::run(state, &["fault", "heal"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout(&out).contains("traffic across the old cut flowed after"),
        "{out:?}"
    );
    let within = Duration::from_secs(60);
    common::run_until(state, &["ssh", "node04", ping], 0, within);
    let out = common::run(state, &["fault", "pause", "node05"]);
    assert!(stdout(&out).contains("paused"), "{out:?}");
    // A paused guest answers nothing: its ping fails on every try.
    assert_ne!(
        common::run(state, &["ssh", "node04", ping]).status.code(),
        Some(0)
    );
    assert_eq!(
        common::run(state, &["fault", "resume", "node05"])
            .status
            .code(),
        Some(0)
    );
    common::run_until(state, &["ssh", "node04", ping], 0, within);

    // A capture by hand: every frame of the fabric into a pcap file, the
    // pings between two guests among them.
    let pcap = artifacts_dir().join("by-hand.pcap");
    let _ = std::fs::remove_file(&pcap);
    let out = common::run(
        state,
        &["capture", "start", "--file", pcap.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    common::run_until(state, &["ssh", "node04", ping], 0, within);
    let out = common::run(state, &["capture", "stop"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let said = stdout(&out);
    let frames: u64 = said
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("capture stop said {said:?}"));
    assert!(frames >= 2, "{said}");
    let bytes = std::fs::read(&pcap).unwrap();
    assert!(
        bytes.starts_with(&[0xd4, 0xc3, 0xb2, 0xa1])
            || bytes.starts_with(&[0xa1, 0xb2, 0xc3, 0xd4]),
        "a pcap file"
    );
    let out = common::run(state, &["capture", "stop"]);
    assert!(stdout(&out).contains("no capture was running"), "{out:?}");

    let (code, result) = fixture_lane(state, "lost-writes");
    assert_eq!(code, Some(1), "discarded reads must fail the check");
    let c = common::check(&result, "etcd-reads-skip-node03");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("lost") && msg.contains("node03 lacks photon/faults/"),
        "{msg}"
    );
    assert!(c["evidence"]["tally"]["lost"].as_u64().unwrap() > 0);
}

/// fresh-smoke from nothing: clean, build, start, every layer, stop. Exit 0
/// with the nested layer honestly degraded under TCG, and the artifact tree.
fn fresh_smoke_passes_with_evidence(state: &Path) {
    let needle = state.to_str().unwrap();
    let root = artifacts_dir().join("fresh");
    // The ready cluster is saved as `default` on the way (`--save-ready`):
    // the scenarios after this one restore it instead of booting again.
    // Twice the default ready timeout, as `boot_cold`: a slow host is
    // measured, not failed.
    let t = Instant::now();
    let out = common::run(
        state,
        &[
            "fresh-smoke",
            "--save-ready",
            "--ready-timeout",
            "1200",
            "--artifacts",
            root.to_str().unwrap(),
        ],
    );
    eprintln!("fresh-smoke: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(out.status.code(), Some(0), "fresh-smoke");
    let table = stdout(&out);
    for layer in [
        "image",
        "boot",
        "protocols",
        "replicated",
        "nested",
        "entrypoints",
        "auth",
        "health",
    ] {
        assert!(
            table.lines().any(|l| l.starts_with(layer)),
            "table row {layer}: {table}"
        );
    }
    assert_eq!(
        common::qemu_pids_mentioning(needle),
        Vec::<i32>::new(),
        "stopped after the smoke"
    );

    let dir = root.join("smoke/latest");
    let result = read_json(&dir.join("result.json"));
    let steps: Vec<(&str, &str)> = result["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["outcome"].as_str().unwrap()))
        .collect();
    let names: Vec<&str> = steps.iter().map(|s| s.0).collect();
    assert_eq!(
        names,
        ["clean", "build", "start", "save-ready", "smoke", "stop"]
    );
    assert!(steps.iter().all(|s| s.1 != "fail"), "{steps:?}");
    let out = common::run(state, &["snapshot", "list"]);
    assert!(stdout(&out).starts_with("default "), "{}", stdout(&out));
    assert_eq!(
        steps[4].1,
        result["status"].as_str().unwrap(),
        "the smoke step sums up the layers"
    );
    for layer in result["layers"].as_array().unwrap() {
        let want = if layer["name"] == "nested" && result["accel"]["used"] == "tcg" {
            "degraded"
        } else if layer["name"] == "nested" {
            layer["outcome"].as_str().unwrap()
        } else {
            "pass"
        };
        assert_eq!(layer["outcome"], want, "{}", layer["name"]);
    }
    let nested = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "nested")
        .unwrap();
    for c in nested["checks"].as_array().unwrap() {
        if c["outcome"] == "degraded" {
            assert!(
                c["message"].as_str().unwrap().starts_with("no nested KVM"),
                "{c}"
            );
            assert_eq!(c["evidence"]["tcg_attempt"]["booted"], true, "{c}");
        }
    }
    let kv = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["checks"].as_array().unwrap())
        .find(|c| c["id"] == "etcd-converge@node01")
        .unwrap();
    assert!(kv["evidence"]["converged_after_s"].as_f64().unwrap() > 0.0);
    assert_eq!(kv["evidence"]["members"].as_object().unwrap().len(), 3);

    let junit = std::fs::read_to_string(dir.join("junit.xml")).unwrap();
    let checks: usize = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["checks"].as_array().unwrap().len())
        .sum();
    assert_eq!(
        junit.matches("<testcase ").count(),
        checks,
        "one test case per check"
    );
    assert!(junit.contains(r#"failures="0""#));
    assert!(dir.join("report.md").is_file());
    let seen = common::browser::assert_readable(&dir, &screenshots(), "e2e-fresh-smoke");
    assert_eq!(seen["failures"], serde_json::json!([]));
    boot_phases_in_order(&result);
    for node in ["node01", "node02", "node03", "node04", "node05", "node06"] {
        let log = dir.join("nodes").join(node).join("vm.log");
        assert!(
            std::fs::metadata(&log)
                .map(|m| m.len() > 0)
                .unwrap_or(false),
            "{}",
            log.display()
        );
    }
    assert!(
        std::fs::metadata(dir.join("nodes/node01/journal/etcd.service.log"))
            .unwrap()
            .len()
            > 0
    );
}

/// `status --json` once every node is ready. `status` asks each node over
/// SSH; right after a slow boot or a restore a starved guest may miss its
/// 20 s and be `unreachable` (with its `error`): it is asked again, up to
/// three times, 15 s apart. The last answer is returned either way.
fn status_when_ready(state: &Path, extra: &[&str]) -> Value {
    // Waits with a deadline (a node may still be catching up after a save
    // or a restore on a busy host) and says how long it took.
    let t = Instant::now();
    loop {
        let out = common::run(state, &[extra, &["status", "--json"]].concat());
        assert_eq!(out.status.code(), Some(0));
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        let nodes = status["nodes"].as_array().unwrap();
        if nodes.iter().all(|n| n["state"] == "ready") {
            eprintln!("every node ready after {:.1} s", t.elapsed().as_secs_f64());
            return status;
        }
        for n in nodes.iter().filter(|n| n["state"] == "unreachable") {
            assert!(n["error"].is_string(), "unreachable says why: {n}");
        }
        if t.elapsed() > Duration::from_secs(120) {
            eprintln!("not every node ready after 120 s");
            return status;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// Saves the ready cluster as the `default` snapshot; it keeps running.
fn snapshot_the_ready_cluster(state: &Path) {
    let t = Instant::now();
    let out = common::run(state, &["snapshot", "save"]);
    assert_eq!(out.status.code(), Some(0), "snapshot save");
    eprintln!("snapshot save: {:.1} s", t.elapsed().as_secs_f64());
    let status = status_when_ready(state, &[]);
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "ready", "resumed after the save: {n}");
    }
    let out = common::run(state, &["snapshot", "list"]);
    assert!(stdout(&out).starts_with("default "), "{}", stdout(&out));
}

/// `fresh-smoke --warm` restores the snapshot instead of booting: the
/// restored cluster passes smoke like a cold one (even though the cluster
/// it was saved from was broken on purpose later), its clocks are right,
/// and result.json says it was warm. A stale or missing snapshot is
/// refused with exit 2 before anything starts.
fn warm_restore_passes_smoke(state: &Path) {
    let root = artifacts_dir().join("warm");
    let t = Instant::now();
    let out = common::run(
        state,
        &[
            "fresh-smoke",
            "--warm",
            "--artifacts",
            root.to_str().unwrap(),
        ],
    );
    eprintln!("fresh-smoke --warm: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(out.status.code(), Some(0), "warm fresh-smoke");
    let result = read_json(&root.join("smoke/latest/result.json"));
    assert_eq!(result["boot"]["mode"], "warm", "{}", result["boot"]);
    assert_eq!(result["boot"]["snapshot"], "default");
    let start = result["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "start")
        .unwrap();
    eprintln!("warm restore-to-ready: {} s", start["duration_s"]);

    // The clocks: restored guests must not live at the time of the save.
    let out = common::run(state, &["start", "--warm"]);
    assert_eq!(out.status.code(), Some(0), "start --warm");
    let out = common::run(state, &["ssh", "node02", "date +%s"]);
    let guest: i64 = stdout(&out).trim().parse().unwrap();
    let host = chrono::Utc::now().timestamp();
    assert!(
        (guest - host).abs() <= 10,
        "guest clock {guest}, host {host}"
    );
    assert_eq!(common::run(state, &["stop"]).status.code(), Some(0));

    // A snapshot that no longer matches is refused, never used.
    let manifest = state.join("snapshots/default/manifest.json");
    let saved = std::fs::read_to_string(&manifest).unwrap();
    let mut m: Value = serde_json::from_str(&saved).unwrap();
    m["key"]["image"] = "an-older-image".into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let out = common::run(state, &["start", "--from-snapshot"]);
    assert_eq!(out.status.code(), Some(2), "a stale snapshot exits 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match") && err.contains("an-older-image"),
        "{err}"
    );
    assert!(!state.join("cluster.json").exists(), "nothing started");
    std::fs::write(&manifest, saved).unwrap();
    let out = common::run(state, &["start", "--from-snapshot", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "a missing snapshot exits 2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("saved: default"));
}

/// Stops the cluster when the test panics, so a failed assertion does not
/// leave six QEMUs running on the CI machine.
struct StopOnPanic(std::path::PathBuf);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            common::run(&self.0, &["stop", "--grace", "5"]);
        }
    }
}

/// Issue 13 on the running cluster: every host socket on 127.0.0.1, no
/// password login, a private state directory, a secret planted in a
/// guest's kernel log redacted from the artifacts, the global --timeout of
/// a lane, and a full artifact disk.
fn guards_and_limits_on_the_running_cluster(state: &Path) {
    let out = common::run(state, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut pids: Vec<(String, i64)> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["pid"].as_i64().unwrap(),
            )
        })
        .collect();
    pids.push((
        "fabric switch".into(),
        status["fabric"]["switch_pid"].as_i64().unwrap(),
    ));
    for (what, pid) in &pids {
        let sockets = common::bound_sockets(*pid as i32);
        assert!(!sockets.is_empty(), "{what} (pid {pid}) has no sockets");
        let open: Vec<&String> = sockets
            .iter()
            .filter(|s| !s.split(' ').nth(1).unwrap().starts_with("127.0.0.1:"))
            .collect();
        assert!(open.is_empty(), "{what} listens beyond 127.0.0.1: {open:?}");
    }

    // No password login: sshd offers only keys, and a password is refused.
    let port = status["nodes"][0]["ssh_port"].as_u64().unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
    let mut s = ssh2::Session::new().unwrap();
    s.set_tcp_stream(tcp);
    s.set_timeout(30_000);
    s.handshake().unwrap();
    let methods = s.auth_methods("root").unwrap_or_default().to_string();
    assert!(!methods.contains("password"), "sshd offers {methods}");
    assert!(s.userauth_password("root", "root").is_err());
    assert!(!s.authenticated());

    // Private state: the directory 0700, the keys and the secret 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(state), 0o700, "state directory");
    assert_eq!(mode(&state.join("ssh/id_ed25519")), 0o600);
    assert_eq!(mode(&state.join("ssh/iam-secret")), 0o600);

    // A service that logs a secret: it reaches the kernel log and console.
    let out = common::run(
        state,
        &[
            "ssh",
            "node06",
            "echo \"photon-leak-test $(cat /etc/prometheus/iam-secret)\" > /dev/kmsg",
        ],
    );
    assert_eq!(out.status.code(), Some(0));

    // The lane's global timeout: it stops mid-lane, collects the evidence,
    // writes the artifacts with status timeout and exits 124; the cluster
    // it did not start keeps running. The lane's check sleeps 600 s, so the
    // timeout decides the end however fast the machine is (a fast CI
    // machine once finished the whole smoke lane inside 20 s).
    let root = artifacts_dir().join("timeout");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/outlasts-timeout.toml");
    let t = Instant::now();
    let out = common::run(
        state,
        &[
            "--timeout",
            "20",
            "smoke",
            "--lane-file",
            fixture.to_str().unwrap(),
            "--artifacts",
            root.to_str().unwrap(),
        ],
    );
    let took = t.elapsed().as_secs_f64();
    eprintln!("smoke --timeout 20 on a 600 s check: exited after {took:.1} s");
    assert_eq!(out.status.code(), Some(124), "lane timeout");
    assert!(String::from_utf8_lossy(&out.stderr).contains("error[timeout]"));
    // Ended by the timeout, not by the check: well before the 600 s sleep.
    assert!(
        took < 300.0,
        "the timeout did not end the lane: {took:.1} s"
    );
    let dir = root.join("outlasts-timeout/latest");
    let result = read_json(&dir.join("result.json"));
    assert_eq!(result["status"], "timeout");
    assert_eq!(result["exit_code"], 124);
    assert_eq!(result["error_kind"], "timeout");
    let out = common::run(state, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "the cluster still runs");

    // The planted secret was redacted, and no secret is anywhere in them.
    let needles = common::secret_needles(state);
    assert!(needles.len() >= 7, "secrets found: {}", needles.len());
    assert_eq!(
        common::files_containing(&root, &needles),
        Vec::<String>::new()
    );
    let kernel = std::fs::read_to_string(dir.join("nodes/node06/journal/kernel.log")).unwrap();
    assert!(
        kernel.contains("photon-leak-test [redacted]"),
        "planted line not found redacted"
    );
    assert_eq!(common::world_writable(&root), Vec::<String>::new());

    // The artifact disk full during a lane: a clear error naming the file,
    // exit 3, and no half-written result.json.
    let full = artifacts_dir().join("full");
    let tmpfs = common::Tmpfs::mount(&full, "256k");
    let out = common::run(state, &["smoke", "--artifacts", full.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let result = std::fs::read(full.join("smoke/latest/result.json"));
    drop(tmpfs);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("error[disk_full]"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("result.json"),
        "names what it could not write: {err}"
    );
    if let Ok(bytes) = result {
        serde_json::from_slice::<Value>(&bytes).expect("result.json is whole or absent");
    }
}

/// Two clusters of different profiles side by side: a one-node cluster
/// (its own file, state directory, ports and fabric) boots and answers
/// while the reference cluster runs, and neither touches the other.
fn a_second_profile_runs_beside_it(state: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    common::image_dir_with_cmdline(&images, "");
    let file = common::one_node_cluster(tmp.path(), &images);
    let other = tmp.path().join("state");
    let cluster = ["--cluster", file.to_str().unwrap()];
    let t = Instant::now();
    let out = common::run(&other, &[&cluster[..], &["start"]].concat());
    assert_eq!(out.status.code(), Some(0), "the second cluster starts");
    eprintln!(
        "second cluster beside the first: ready after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (a, b) = (
        status_when_ready(state, &[]),
        status_when_ready(&other, &cluster),
    );
    let ports = |v: &Value| -> Vec<u64> {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["ssh_port"].as_u64().unwrap())
            .collect()
    };
    assert!(
        ports(&b).iter().all(|p| !ports(&a).contains(p)),
        "ports shared"
    );
    assert_ne!(a["fabric"]["switch_pid"], b["fabric"]["switch_pid"]);
    assert_eq!(b["nodes"][0]["state"], "ready");
    let out = common::run(
        &other,
        &[&cluster[..], &["ssh", "solo", "hostname"]].concat(),
    );
    assert_eq!(stdout(&out).trim(), "solo");
    // Its stop leaves the reference cluster as it was.
    let out = common::run(&other, &[&cluster[..], &["stop", "--grace", "1"]].concat());
    assert_eq!(out.status.code(), Some(0));
    for n in status_when_ready(state, &[])["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "ready", "{n}");
    }
}

/// The shared state directory with the images built and no cluster left
/// over from an aborted earlier run.
fn built_state() -> std::path::PathBuf {
    let state = common::state_dir();
    assert_eq!(
        common::run(&state, &["build"]).status.code(),
        Some(0),
        "build"
    );
    common::run(&state, &["stop", "--grace", "5"]);
    state
}

/// Whether a cluster runs in the shared state directory.
fn cluster_runs(state: &Path) -> bool {
    common::run(state, &["status"]).status.code() == Some(0)
}

/// Whether every node of a `status --json` document is ready.
fn all_ready(status: &Value) -> bool {
    status["nodes"]
        .as_array()
        .is_some_and(|n| !n.is_empty() && n.iter().all(|n| n["state"] == "ready"))
}

/// Boots the shared cluster cold and saves it as the `default` snapshot.
/// The first boot after the image build has been the slowest here (470-600
/// s on a busy host, against 240 s later in the same run): it gets twice
/// the default ready timeout, so that a slow host is measured, not failed.
fn boot_cold(state: &Path) {
    let t = Instant::now();
    let out = common::run(state, &["start", "--ready-timeout", "1200"]);
    assert_eq!(out.status.code(), Some(0), "start");
    eprintln!("boot-to-ready: {:.1} s", t.elapsed().as_secs_f64());
}

/// The shared cluster, running and ready, for a scenario that needs one.
/// The cold-boot scenario boots it and saves the `default` snapshot; a
/// scenario run alone, or after one that failed and stopped the cluster,
/// gets it back from that snapshot (a warm restore, seconds instead of a
/// boot), or boots and saves it when there is no usable snapshot.
fn ready_cluster() -> std::path::PathBuf {
    let state = common::state_dir();
    if cluster_runs(&state) && all_ready(&status_when_ready(&state, &[])) {
        return state;
    }
    let state = built_state();
    if state.join("snapshots/default/manifest.json").is_file() {
        let out = common::run(&state, &["start", "--warm"]);
        // A restored guest on a loaded host may answer slowly at first:
        // waited for with a deadline, never judged on one `status`.
        if out.status.code() == Some(0) && all_ready(&status_when_ready(&state, &[])) {
            return state;
        }
        common::run(&state, &["stop", "--grace", "5"]);
    }
    boot_cold(&state);
    snapshot_the_ready_cluster(&state);
    state
}

// The scenarios run in the order of their names (libtest sorts them; the
// suite runs with --test-threads=1), sharing one booted cluster. Each one
// can also run alone (`cargo test --test cluster_e2e s05`): it gets the
// cluster it needs from `ready_cluster`. A failed scenario stops the
// cluster (`StopOnPanic`), and the next restores the snapshot, so one
// failure hides nothing after it.

#[test]
fn s01_interrupt_and_sigkill_during_start() {
    let state = built_state();
    let _stop = StopOnPanic(state.clone());
    interrupt_during_start_leaves_nothing(&state);
    sigkill_during_start_is_reaped_by_the_next_command(&state);
}

/// The README's first command boots the shared cluster from nothing and
/// saves it ready; every later scenario restores that snapshot.
#[test]
fn s02_fresh_smoke_then_the_cli_on_its_saved_cluster() {
    let state = built_state();
    let _stop = StopOnPanic(state.clone());
    fresh_smoke_passes_with_evidence(&state);
    let state = ready_cluster();
    the_cli_on_the_ready_cluster(&state);
}

#[test]
fn s03_guards_and_limits() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    guards_and_limits_on_the_running_cluster(&state);
}

#[test]
fn s04_a_second_profile_beside_it() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    a_second_profile_runs_beside_it(&state);
}

#[test]
fn s05_faults_by_hand() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    faults_by_hand(&state);
}

#[test]
fn s06_smoke_fails_at_the_broken_unit() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    smoke_fails_at_the_broken_unit(&state);
}

#[test]
fn s07_proof_lane() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    proof_lane(&state);
}

#[test]
fn s08_matrix_lane() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    matrix_lane(&state);
}

#[test]
fn s09_bench_storage_lane() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    bench_storage_lane(&state);
}

#[test]
fn s10_lanes_broken_on_purpose() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    lanes_broken_on_purpose(&state);
}

#[test]
fn s11_rerun_three_times_from_the_snapshot() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    rerun_three_times(&state);
}

/// Test scripts on the shared cluster, in the style of nixpkgs' own tests
/// for the same servers: DNS primary and secondaries, HAProxy losing a
/// backend, a partition and its heal, an etcd member shut down and back.
/// Every subtest is a check of its own in result.json and JUnit.
#[test]
fn s11b_test_scripts_in_the_nixpkgs_style() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    let t = Instant::now();
    let (code, result) = fixture_lane(&state, "nixpkgs-style-scripts");
    eprintln!("nixpkgs-style scripts: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(code, Some(0), "{result}");
    let checks: Vec<&Value> = result["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["checks"].as_array().unwrap())
        .collect();
    for (script, subtests) in [
        ("dns-zone", 4),
        ("haproxy-backend", 3),
        ("partition", 3),
        ("etcd-member", 3),
    ] {
        let parts: Vec<&&Value> = checks.iter().filter(|c| c["part_of"] == script).collect();
        assert_eq!(parts.len(), subtests, "{script}: {parts:?}");
        for p in parts {
            assert_eq!(p["kind"], "subtest", "{p}");
            assert_eq!(p["outcome"], "pass", "{p}");
            assert!(p["id"].as_str().unwrap().starts_with(&format!("{script}/")));
        }
    }
    let dir = artifacts_dir().join("lanes/nixpkgs-style-scripts/latest");
    let junit = std::fs::read_to_string(dir.join("junit.xml")).unwrap();
    assert!(
        junit.contains("etcd-member/the member comes back and catches up"),
        "{junit}"
    );
}

#[test]
fn s12_stop_leaves_nothing() {
    let state = ready_cluster();
    let _stop = StopOnPanic(state.clone());
    stop_leaves_nothing(&state);
}

#[test]
fn s13_warm_restore_passes_smoke() {
    // It restores the `default` snapshot itself: a stopped cluster is all it
    // needs (run alone, `ready_cluster` saves the snapshot first).
    let state = built_state();
    if !state.join("snapshots/default/manifest.json").is_file() {
        ready_cluster();
    }
    common::run(&state, &["stop"]);
    let _stop = StopOnPanic(state.clone());
    warm_restore_passes_smoke(&state);
}

#[test]
fn s15_compare_two_real_runs() {
    compare_two_real_runs();
}

/// `rerun --times 3` of the smoke lane on the shared cluster, each run from
/// the `default` snapshot: every check passes every time, each run keeps
/// its own artifacts, report.html has the rerun section, the cluster is
/// left running (restored), and no check changed outcome between the first
/// and the last run.
fn rerun_three_times(state: &Path) {
    let root = artifacts_dir().join("rerun");
    let _ = std::fs::remove_dir_all(&root);
    let t = Instant::now();
    let out = common::run(
        state,
        &[
            "rerun",
            "--times",
            "3",
            "--snapshot",
            "default",
            "--artifacts",
            root.to_str().unwrap(),
            "--json",
        ],
    );
    eprintln!("rerun --times 3: {:.1} s", t.elapsed().as_secs_f64());
    let doc: Value = serde_json::from_slice(&out.stdout).expect("rerun --json");
    let checks = doc["rerun"]["checks"].as_array().unwrap();
    // The pass rate of every check over the runs, for the record.
    for c in checks {
        eprintln!(
            "rerun: {} {} pass rate {}",
            c["id"], c["verdict"], c["pass_rate"]
        );
    }
    let not_passing: Vec<&Value> = checks
        .iter()
        .filter(|c| !["pass", "skipped", "degraded"].contains(&c["verdict"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        out.status.code(),
        Some(0),
        "checks that did not pass: {not_passing:?}"
    );
    assert_eq!(doc["command"], "rerun");
    let runs = doc["rerun"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{runs:?}");
    for c in checks {
        if c["verdict"] == "pass" {
            assert_eq!(c["pass_rate"], 1.0, "{c}");
        }
    }
    let dir = root.join("rerun-smoke/latest");
    for i in 1..=3 {
        assert!(
            dir.join(format!("run-{i}/result.json")).is_file(),
            "run-{i}"
        );
    }
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        html.contains("id=\"rerun\""),
        "report.html has the rerun section"
    );
    assert_eq!(common::run(state, &["status"]).status.code(), Some(0));
    // The first and the last run: no check changed its outcome (single
    // figures may move with the host's load; they are reported, not judged
    // here).
    let (first, last) = (dir.join("run-1"), dir.join("run-3"));
    let out = common::bin()
        .args([
            "compare",
            "--json",
            first.to_str().unwrap(),
            last.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let cmp: Value = serde_json::from_slice(&out.stdout).expect("compare --json");
    assert_eq!(cmp["checks"], json!([]), "{cmp}");
    assert!(cmp["run_regressed"].is_null(), "{cmp}");
}

/// `stop`: no QEMU remains, cluster.json is gone, and each console is kept
/// where the seed documents it: `<state-dir>/<node>/vm.log`.
fn stop_leaves_nothing(state: &Path) {
    let needle = state.to_str().unwrap().to_string();
    let status = status_when_ready(state, &[]);
    let out = common::run(state, &["stop"]);
    assert_eq!(out.status.code(), Some(0), "stop");
    assert_eq!(
        common::qemu_pids_mentioning(&needle),
        Vec::<i32>::new(),
        "no QEMU may remain after stop"
    );
    assert!(!state.join("cluster.json").exists());
    for n in status["nodes"].as_array().unwrap() {
        let log = state.join(n["name"].as_str().unwrap()).join("vm.log");
        assert!(
            std::fs::metadata(&log).unwrap().len() > 0,
            "{} kept",
            log.display()
        );
    }
}

/// Right after the cold boot: every node ready with its units active, the
/// accelerator's fallback explained, the preflight agreeing with it, a
/// second start refused, and `ssh` passing commands, quoting and exit codes.
fn the_cli_on_the_ready_cluster(state: &Path) {
    let state = state.to_path_buf();
    let status = status_when_ready(&state, &[]);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 6);
    for n in nodes {
        assert_eq!(n["state"], "ready", "node not ready: {n}");
        assert!(
            n["units"]
                .as_object()
                .unwrap()
                .values()
                .all(|s| s == "active"),
            "{n}"
        );
    }
    let accel = &status["accel"];
    if accel["used"] == "tcg" && Path::new("/dev/kvm").exists() && accel["requested"] == "auto" {
        assert!(
            accel["fallback_reason"].is_string(),
            "a fallback from KVM must say why: {accel}"
        );
    }

    // The preflight tells the truth: it says pass for KVM only where the
    // guests really run under KVM (an openable /dev/kvm is not enough).
    let out = common::run(&state, &["validate", "--json"]);
    let items: Value = serde_json::from_slice(&out.stdout).unwrap();
    let kvm = items
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["item"] == "kvm")
        .unwrap();
    assert_eq!(
        kvm["outcome"] == "pass",
        accel["used"] == "kvm",
        "validate {kvm} against start {accel}"
    );

    // One state directory, one cluster: a second start is refused untouched.
    let again = common::run(&state, &["start"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("in use by another")
            || String::from_utf8_lossy(&again.stderr).contains("already running")
    );

    let out = common::run(&state, &["ssh", "node04", "systemctl", "is-system-running"]);
    let answer = stdout(&out);
    assert!(
        ["running", "degraded", "starting"].contains(&answer.trim()),
        "systemctl answered: {answer:?}"
    );

    // The fabric: names resolve and the L2 segment carries traffic between guests.
    let out = common::run(
        &state,
        &[
            "ssh",
            "node04",
            "getent hosts node06 && ping -c 2 -W 5 node06",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "node04 reaches node06 over the fabric"
    );
    assert!(stdout(&out).contains("10.77.0.16"));
    let out = common::run(&state, &["ssh", "node06", "hostname"]);
    assert_eq!(stdout(&out).trim(), "node06");
    let out = common::run(&state, &["ssh", "node01", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "ssh passes on the remote exit code"
    );
    // Several arguments keep their quoting: spaces, quotes, an empty one.
    let out = common::run(
        &state,
        &["ssh", "node01", "--", "printf", "[%s]", "a b", "it's", ""],
    );
    assert_eq!(stdout(&out), "[a b][it's][]");
}

/// `compare` on two real runs of this suite: the warm smoke (s13) against
/// the fresh one (s02). Their checks are the same; the boot differs and is
/// named. The exit code follows what the comparison found, in both forms.
/// Run alone, without those two runs, it makes two smoke runs of its own on
/// the shared cluster.
fn compare_two_real_runs() {
    let mut warm = artifacts_dir().join("warm/smoke/latest");
    let mut fresh = artifacts_dir().join("fresh/smoke/latest");
    let warm_and_fresh = warm.join("result.json").is_file() && fresh.join("result.json").is_file();
    if !warm_and_fresh {
        let state = ready_cluster();
        let _stop = StopOnPanic(state.clone());
        for (name, dir) in [("compare-a", &mut warm), ("compare-b", &mut fresh)] {
            let root = artifacts_dir().join(name);
            common::run(&state, &["smoke", "--artifacts", root.to_str().unwrap()]);
            *dir = root.join("smoke/latest");
        }
    }
    let (w, f) = (warm.to_str().unwrap(), fresh.to_str().unwrap());
    let out = common::echo(
        &["compare", w, f],
        common::bin().args(["compare", w, f]).output().unwrap(),
    );
    let text = stdout(&out);
    if warm_and_fresh {
        assert!(
            text.contains("boot"),
            "a warm and a cold boot differ: {text}"
        );
    }
    let json = common::bin()
        .args(["compare", "--json", w, f])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["exit_code"], json!(out.status.code().unwrap()), "{doc}");
    assert_eq!(json.status.code(), out.status.code());
    let itself = common::bin().args(["compare", w, w]).output().unwrap();
    assert_eq!(itself.status.code(), Some(0));
    assert!(stdout(&itself).contains("nothing changed"));
}
