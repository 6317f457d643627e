//! Faults of the guests themselves, each reported as a named error within
//! its deadline with the evidence that explains it. One small guest each.

mod common;

use std::fs;
use std::path::Path;

/// An image directory whose node `solo` boots the reference image with
/// extra kernel arguments (image::dir: `<dir>/<node>/` with a `cmdline`).
fn image_dir_with_cmdline(dir: &Path, cmdline: &str) {
    let images = common::reference_images();
    fs::create_dir_all(dir.join("solo")).unwrap();
    for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
        let to = dir.join("solo").join(f);
        let _ = fs::remove_file(&to);
        std::os::unix::fs::symlink(images.join(f), &to).unwrap();
    }
    fs::write(dir.join("solo/cmdline"), cmdline).unwrap();
}

fn one_node_cluster(dir: &Path, images: &Path) -> std::path::PathBuf {
    let text = include_str!("fixtures/one-node.toml").replace(
        "provider = \"debian\"\nsuite = \"bookworm\"",
        &format!("provider = \"prebuilt\"\ndir = \"{}\"", images.display()),
    );
    let file = dir.join("cluster.toml");
    fs::write(&file, text).unwrap();
    file
}

/// Stops whatever a test started, also when an assertion fails first.
struct StopOnDrop<'a>(&'a Path, &'a Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let cluster = self.1.to_str().unwrap();
        common::run(self.0, &["--cluster", cluster, "stop", "--grace", "1"]);
    }
}

/// A guest whose kernel panics: `start` fails (exit 3) and its error quotes
/// the panic line and the call trace, found by scanning the console, not
/// the register dump at its end. Nothing is left running.
#[test]
fn a_guest_kernel_panic_is_reported_with_its_panic_line() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    // No init in the initramfs: the kernel mounts the root itself, has no
    // virtio driver for it (a module), and panics ("VFS: Unable to mount
    // root fs").
    image_dir_with_cmdline(&images, "rdinit=/nonexistent root=/dev/vdz");
    let cluster = one_node_cluster(tmp.path(), &images);
    let state = tmp.path().join("state");
    let _stop = StopOnDrop(&state, &cluster);
    let out = common::run(
        &state,
        &[
            "--cluster",
            cluster.to_str().unwrap(),
            "start",
            "--accel",
            "tcg",
            "--ready-timeout",
            "300",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "an infrastructure failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("QEMU exited during boot"), "{err}");
    assert!(err.contains("Kernel panic - not syncing"), "{err}");
    assert!(err.contains("Call Trace:"), "{err}");
    let needle = state.to_str().unwrap();
    assert_eq!(common::qemu_pids_mentioning(needle), Vec::<i32>::new());
}
