//! Bad input is refused with exit code 2 before anything starts, and the
//! error points at the file, line and field. No VMs are needed.

mod common;

use std::fs;

fn temp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pc-refuse-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn malformed_cluster_file_exits_2_with_file_line_and_field() {
    let dir = temp("malformed");
    let file = dir.join("cluster.toml");
    let text = include_str!("../profiles/reference.toml").replace(
        "name = \"node05\"\nrole = \"worker\"",
        "name = \"node05\"\nrole = \"wrker\"",
    );
    fs::write(&file, &text).unwrap();
    let line = text.lines().position(|l| l.contains("wrker")).unwrap() + 1;
    let out = common::run(&dir, &["--cluster", file.to_str().unwrap(), "start"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cluster.toml:{line}:")),
        "error names file and line: {err}"
    );
    assert!(err.contains("node[4].role"), "error names the field: {err}");
    assert!(err.contains("unknown role \"wrker\""), "{err}");
    assert!(
        !dir.join("nodes").exists(),
        "nothing may start on refused input"
    );
}

#[test]
fn dependency_cycle_exits_2_on_check() {
    let dir = temp("cycle");
    let file = dir.join("cluster.toml");
    let text = include_str!("../profiles/reference.toml").replace(
        "name = \"node01\"\nrole = \"control\"",
        "name = \"node01\"\nrole = \"control\"\ndepends_on = [\"node06\"]",
    );
    fs::write(&file, text).unwrap();
    let out = common::run(&dir, &["--cluster", file.to_str().unwrap(), "check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dependency cycle: node01 -> node06 -> node01"),
        "{err}"
    );
}

#[test]
fn start_without_a_built_image_exits_2_with_a_hint() {
    let dir = temp("noimage");
    let out = common::run(&dir, &["start"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing image"), "{err}");
    assert!(err.contains("photon-cluster build"), "{err}");
    assert!(!dir.join("cluster.json").exists());
}

#[test]
fn a_busy_state_directory_exits_2_and_names_the_holder() {
    let dir = temp("busy");
    // Hold the lock the way another photon-cluster command would.
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .unwrap();
    lock.try_lock().unwrap();
    fs::write(dir.join("lock.owner"), "start (pid 4242)\n").unwrap();
    let out = common::run(&dir, &["start"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another photon-cluster command"),
        "{err}"
    );
    assert!(err.contains("start (pid 4242)"), "{err}");
    drop(lock);
}

#[test]
fn status_without_a_cluster_exits_2() {
    let dir = temp("nocluster");
    let out = common::run(&dir, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster is running"));
}

#[test]
fn embedded_profiles_check_and_storage_gets_a_sibling_state_dir() {
    let dir = temp("profiles");
    for p in ["reference", "reference-storage"] {
        let out = common::run(&dir, &["--profile", p, "check"]);
        assert_eq!(out.status.code(), Some(0));
    }
    let out = common::run(&dir, &["--profile", "nope", "check"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_teaches_the_commands_and_exit_codes() {
    let out = common::bin().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "build",
        "start",
        "status",
        "ssh",
        "stop",
        "clean",
        "Exit codes",
    ] {
        assert!(help.contains(word), "--help mentions {word}: {help}");
    }
}

#[test]
fn malformed_lane_file_exits_2_with_file_line_and_field() {
    let dir = temp("lane");
    let file = dir.join("lane.toml");
    let text = include_str!("../checks/smoke.toml").replace(
        "name = \"web\"\nkind = \"http\"\ntargets = \"role:worker\"",
        "name = \"web\"\nkind = \"http\"\ntargets = \"role:wrker\"",
    );
    fs::write(&file, &text).unwrap();
    let out = common::run(&dir, &["smoke", "--lane-file", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().position(|l| l == "name = \"web\"").unwrap();
    assert!(err.contains(&format!("lane.toml:{line}:")), "{err}");
    assert!(err.contains(".targets"), "{err}");
    assert!(err.contains("role:wrker"), "{err}");
}

#[test]
fn smoke_without_a_running_cluster_exits_2() {
    let dir = temp("smoke-idle");
    let out = common::run(
        &dir,
        &["smoke", "--artifacts", dir.join("work").to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cluster is running"));
    assert!(
        !dir.join("work").exists(),
        "nothing written for refused input"
    );
}

#[test]
fn validate_reports_every_item_with_hints_and_boots_nothing() {
    let dir = temp("validate");
    let out = common::run(&dir, &["validate", "--json"]);
    let items: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = items.as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|i| i["item"].as_str().unwrap()).collect();
    for want in [
        "qemu-system-x86_64",
        "kvm",
        "nested-virt",
        "memory",
        "disk",
        "ports",
        "cluster",
        "lane",
        "image",
        "state",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for i in items {
        if i["outcome"] != "pass" {
            assert!(i["hint"].is_string(), "a non-pass item needs a hint: {i}");
        }
    }
    let failed = items.iter().any(|i| i["outcome"] == "fail");
    assert_eq!(out.status.code(), Some(if failed { 1 } else { 0 }));
    // An empty state directory has no image yet: reported, not fatal.
    let image = items.iter().find(|i| i["item"] == "image").unwrap();
    assert_ne!(image["outcome"], "pass", "{image}");
    assert!(!dir.join("nodes").exists(), "validate boots nothing");
}

#[test]
fn hermetic_run_refuses_paths_outside_the_store() {
    let dir = temp("hermetic");
    let images = dir.join("images");
    fs::create_dir_all(&images).unwrap();
    for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
        fs::write(images.join(f), "x").unwrap();
    }
    let out_dir = dir.join("out");
    let run = || {
        let args = [
            "run",
            "--out",
            out_dir.to_str().unwrap(),
            "--image-dir",
            images.to_str().unwrap(),
        ];
        common::run(&dir, &args)
    };
    let out = run();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in /nix/store"), "{err}");
    assert!(err.contains("rootfs.img"), "{err}");
    assert!(err.contains("qemu-system-x86_64"), "{err}");
    assert!(!out_dir.exists(), "nothing written before the refusal");

    // A lane with a script check: python3 is judged like the other tools.
    // Every other path allowed, one by one, python3 alone is refused.
    fs::write(dir.join("t.py"), "pass\n").unwrap();
    let lane = dir.join("scripted.toml");
    fs::write(
        &lane,
        "[lane]\nname = \"scripted\"\ndescription = \"a script check\"\n\
         [[layer]]\nname = \"s\"\n[[layer.check]]\nname = \"t\"\nkind = \"script\"\nfile = \"t.py\"\n",
    )
    .unwrap();
    let mut args = vec![
        "run".to_string(),
        "--out".into(),
        out_dir.display().to_string(),
        "--image-dir".into(),
        images.display().to_string(),
        "--lane-file".into(),
        lane.display().to_string(),
        "--allow-impure".into(),
        images.display().to_string(),
        "--allow-impure".into(),
        env!("CARGO_BIN_EXE_photon-cluster").into(),
    ];
    for tool in ["qemu-system-x86_64", "qemu-img", "ssh-keygen", "mkfs.ext4"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} on PATH"));
        for p in [fs::canonicalize(&found).unwrap(), found] {
            args.extend(["--allow-impure".into(), p.display().to_string()]);
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::run(&dir, &args);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("python3: "), "{err}");
    assert!(!err.contains("qemu-system-x86_64"), "{err}");
    assert!(!out_dir.exists(), "nothing written before the refusal");

    // A missing image file is named.
    fs::remove_file(images.join("initrd.img")).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the top level lacks initrd.img"), "{err}");
}

/// A lane naming a tenant port on a node that is no OVN chassis, or a
/// listener backend that does not exist, is refused when it is read: exit 2
/// with the file and line, and nothing created or written.
#[test]
fn provider_lifecycles_naming_what_does_not_exist_exit_2() {
    let proof = include_str!("../checks/provider-vm-reality-proof.toml");
    for (name, from, to, says) in [
        (
            "port",
            "{ name = \"tenant-a-db\", node = \"node05\"",
            "{ name = \"tenant-a-db\", node = \"node06\"",
            "node06 does not run ovn-controller.service",
        ),
        (
            "backend",
            "backends = [\"node04\", \"node05\"]",
            "backends = [\"node04\", \"node09\"]",
            "backend \"node09\" is no node of the cluster",
        ),
        (
            "nic",
            "nic = { network = \"tenant-vm\", address = \"10.88.1.20\" }",
            "nic = { network = \"tenant-vm\", address = \"10.88.1\" }",
            "is no IPv4 address",
        ),
    ] {
        let dir = temp(&format!("lifecycle-{name}"));
        let file = dir.join("lane.toml");
        assert!(proof.contains(from), "{from}");
        let text = proof.replace(from, to);
        fs::write(&file, &text).unwrap();
        let work = dir.join("work");
        let out = common::run(
            &dir,
            &[
                "smoke",
                "--lane-file",
                file.to_str().unwrap(),
                "--artifacts",
                work.to_str().unwrap(),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lane.toml:"), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(!work.exists(), "{name}: nothing written for refused input");
    }
}

#[test]
fn a_fresh_lane_with_a_bad_ready_snapshot_name_exits_2_before_the_clean() {
    for command in ["fresh-smoke", "fresh-matrix", "fresh-bench-storage"] {
        let dir = temp(&format!("save-ready-{command}"));
        fs::create_dir_all(dir.join("nodes/node01")).unwrap();
        let out = common::run(
            &dir,
            &[
                command,
                "--save-ready",
                "../elsewhere",
                "--artifacts",
                dir.join("work").to_str().unwrap(),
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("snapshot name \"../elsewhere\""),
            "{command}: {err}"
        );
        assert!(
            !dir.join("work").exists(),
            "{command}: no artifacts for refused input"
        );
        assert!(
            dir.join("nodes/node01").is_dir(),
            "{command}: nothing cleaned"
        );
    }
}
