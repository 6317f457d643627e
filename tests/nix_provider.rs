//! The nix image provider for real: a flake (builtins only, written here)
//! whose `nodeImages.solo` output holds the Debian image files and a
//! `cmdline`; `build` runs `nix build --json`, records the store and .drv
//! paths (parsed with nix-derivation); `start` boots the node from that
//! output with the image's extra kernel arguments, and `status` shows the
//! store path it booted.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

/// The driver with the cluster file and state dir, and a Nix config that
/// lets builders run the host's /bin/sh as root (as CI's nix-bin does).
fn run(cluster: &Path, state: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_photon-cluster"))
        .arg("--cluster")
        .arg(cluster)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env(
            "NIX_CONFIG",
            "sandbox = false\nbuild-users-group =\nexperimental-features = nix-command flakes",
        )
        .output()
        .unwrap();
    common::echo(args, out)
}

#[test]
fn nix_provider_builds_records_and_boots_a_node() {
    let images = common::reference_images();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nix-provider");
    let _ = fs::remove_dir_all(&dir);
    let flake = dir.join("flake");
    fs::create_dir_all(&flake).unwrap();
    let nonce = format!("{:?}", std::time::SystemTime::now());
    let link = |f: &str| format!("/bin/ln -s {}/{f} $out/{f}", images.display());
    let script = format!(
        "/bin/mkdir $out && {} && {} && {} && echo photon.image=solo > $out/cmdline",
        link("vmlinuz"),
        link("initrd.img"),
        link("rootfs.img")
    );
    fs::write(
        flake.join("flake.nix"),
        format!(
            r#"{{
  outputs = {{ self }}: {{
    nodeImages.solo = derivation {{
      name = "solo-image";
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ "-c" "{script}" ];
      nonce = "{nonce}";
    }};
  }};
}}
"#
        ),
    )
    .unwrap();
    let cluster = dir.join("cluster.toml");
    let text = include_str!("fixtures/one-node.toml")
        .replace("state_suffix = \"one-node\"", "state_suffix = \"\"")
        .replace(
            "provider = \"debian\"\nsuite = \"bookworm\"",
            &format!(
                "provider = \"nix\"\nflake = \"path:{}\"\nattribute = \"nodeImages\"",
                flake.display()
            ),
        );
    fs::write(&cluster, text).unwrap();
    let state = dir.join("state");

    // Not built yet: start refuses with a hint.
    let out = run(&cluster, &state, &["start"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `photon-cluster build` first"));

    let out = run(&cluster, &state, &["build"]);
    assert_eq!(out.status.code(), Some(0), "nix build through the driver");
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(state.join("images/nix-one-node.json")).unwrap()).unwrap();
    let solo = &record["nodes"]["solo"];
    assert!(
        solo["store_path"]
            .as_str()
            .unwrap()
            .starts_with("/nix/store/"),
        "{solo}"
    );
    assert!(
        solo["store_path"]
            .as_str()
            .unwrap()
            .ends_with("-solo-image"),
        "{solo}"
    );
    assert!(
        solo["drv_path"]
            .as_str()
            .unwrap()
            .ends_with("-solo-image.drv"),
        "{solo}"
    );
    assert_eq!(solo["system"], "x86_64-linux");
    assert_eq!(solo["cmdline"], "photon.image=solo");

    let out = run(&cluster, &state, &["start"]);
    assert_eq!(out.status.code(), Some(0), "start from the nix-built image");
    let status = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        status.contains(solo["store_path"].as_str().unwrap()),
        "{status}"
    );
    let out = run(&cluster, &state, &["ssh", "solo", "cat /proc/cmdline"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("photon.image=solo"));
    let out = run(&cluster, &state, &["stop", "--grace", "10"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(common::qemu_pids_mentioning(state.to_str().unwrap()).is_empty());
}
