//! The QEMU command line for one node, as a pure function of its settings.

use crate::fabric::{Link, PortForward};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything that decides a node's QEMU command line.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub name: String,
    pub accel: Accel,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel arguments the image asks for (NixOS: `init=...`).
    pub extra_append: Option<String>,
    pub overlay: PathBuf,
    pub config_disk: PathBuf,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
    /// The host end of the guest agent's virtio-serial port
    /// (`org.photon.agent`): the driver's control channel (src/guest/channel.rs).
    pub agent_socket: PathBuf,
    pub pidfile: PathBuf,
    /// Host ports on 127.0.0.1 forwarded into the guest, SSH first.
    pub forwards: Vec<PortForward>,
    pub host_mac: String,
    pub fabric_mac: String,
    /// How the fabric NIC reaches the cluster's L2 segment.
    pub fabric: Link,
    pub machine_id: String,
    /// Restore the guest's state from this file (a snapshot) instead of booting.
    pub incoming: Option<PathBuf>,
    /// A store shared read-only with the guest over 9p (tag `nix-store`):
    /// a NixOS node booted from the host's store, as qemu-vm.nix does.
    pub store: Option<PathBuf>,
}

/// The `-virtfs` value that shares a store read-only with the guest over
/// 9p (tag `nix-store`), as nixpkgs' qemu-vm.nix shares the host store.
/// QEMU cannot migrate a guest with a mounted 9p share, so such nodes
/// cannot be snapshotted.
pub fn store_share(store: &std::path::Path) -> String {
    format!(
        "local,path={},security_model=none,mount_tag=nix-store,readonly=on",
        path(store)
    )
}

/// The name of the guest agent's virtio-serial port.
pub const AGENT_PORT: &str = "org.photon.agent";

/// Builds the argument list (without the program name).
pub fn qemu_args(c: &MachineConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut arg = |parts: &[&str]| a.extend(parts.iter().map(|s| s.to_string()));
    arg(&["-name", &c.name]);
    arg(&["-nodefaults", "-no-user-config", "-display", "none"]);
    arg(&["-machine", "pc"]);
    match c.accel {
        Accel::Kvm => arg(&["-accel", "kvm", "-cpu", "host"]),
        // QEMU's default CPU model: measured faster to boot under TCG than
        // `max` (50 s vs 66 s for one reference guest here). Without `-svm`
        // it advertises AMD-V, kvm_amd loads in the guest, and an inner
        // `-accel kvm` runs on emulated SVM (2 min 18 s for a busybox guest
        // here): that is not nested KVM, so the guest must not see /dev/kvm.
        Accel::Tcg => arg(&["-accel", "tcg", "-cpu", "qemu64,-svm"]),
    }
    arg(&[
        "-m",
        &c.memory_mib.to_string(),
        "-smp",
        &c.vcpus.to_string(),
    ]);
    // A kernel panic or reboot ends QEMU, so a dead guest never looks slow.
    // no_timer_check: under TCG on a loaded host the kernel's early check
    // of the IO-APIC timer can miss its ticks and panic ("IO-APIC + timer
    // doesn't work!", seen here at a load of 15 on 2 cores); the check
    // tests hardware a virtual machine does not have.
    arg(&["-no-reboot"]);
    arg(&["-kernel", &path(&c.kernel), "-initrd", &path(&c.initrd)]);
    let mut append = format!(
        "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 panic=-1 mitigations=off \
         no_timer_check systemd.machine_id={} systemd.show_status=true",
        c.machine_id
    );
    if let Some(extra) = &c.extra_append {
        append.push(' ');
        append.push_str(extra.trim());
    }
    arg(&["-append", &append]);
    // cache=unsafe: test guests are thrown away, and flushes cost real time under TCG.
    arg(&[
        "-drive",
        &format!(
            "if=none,id=root,file={},format=qcow2,cache=unsafe,discard=unmap",
            path(&c.overlay)
        ),
        "-device",
        "virtio-blk-pci,drive=root",
    ]);
    arg(&[
        "-drive",
        &format!(
            "if=none,id=config,file={},format=raw,readonly=on",
            path(&c.config_disk)
        ),
        "-device",
        "virtio-blk-pci,drive=config",
    ]);
    if let Some(store) = &c.store {
        arg(&["-virtfs", &store_share(store)]);
    }
    let hostfwd: String = c
        .forwards
        .iter()
        .map(|f| {
            format!(
                ",hostfwd={}:127.0.0.1:{}-:{}",
                f.proto.name(),
                f.host,
                f.guest
            )
        })
        .collect();
    arg(&[
        "-netdev",
        &format!("user,id=host,net=10.0.2.0/24{hostfwd}"),
        "-device",
        &format!("virtio-net-pci,netdev=host,mac={}", c.host_mac),
    ]);
    arg(&[
        "-netdev",
        &c.fabric.netdev(),
        "-device",
        &format!("virtio-net-pci,netdev=fabric,mac={}", c.fabric_mac),
    ]);
    arg(&[
        "-object",
        "rng-random,id=rng,filename=/dev/urandom",
        "-device",
        "virtio-rng-pci,rng=rng",
    ]);
    arg(&["-serial", &format!("file:{}", path(&c.serial_log))]);
    arg(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", path(&c.qmp_socket)),
    ]);
    // The control channel: a virtio-serial port the guest agent opens as
    // /dev/virtio-ports/org.photon.agent, its host end a Unix socket the
    // driver connects to (no network, no handshake; nothing listens on
    // a guest network socket).
    arg(&[
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        &format!(
            "socket,id=agent,path={},server=on,wait=off",
            path(&c.agent_socket)
        ),
        "-device",
        &format!("virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}"),
    ]);
    arg(&["-pidfile", &path(&c.pidfile)]);
    if let Some(state) = &c.incoming {
        let quoted = format!("'{}'", path(state).replace('\'', r"'\''"));
        // A compressed state (snapshot.rs) is read through zstd.
        let read = match compressed(state) {
            true => "zstd -dc",
            false => "cat",
        };
        arg(&["-incoming", &format!("exec:{read} {quoted}")]);
    }
    a
}

/// Whether a saved guest state is compressed (zstd, `.zst`): how a
/// restore reads it and how a save writes it (snapshot.rs).
pub fn compressed(state: &std::path::Path) -> bool {
    state.extension().is_some_and(|e| e == "zst")
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Proto;

    fn config(accel: Accel) -> MachineConfig {
        MachineConfig {
            name: "node04".into(),
            accel,
            memory_mib: 1024,
            vcpus: 1,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            extra_append: Some("init=/nix/store/x-system/init".into()),
            overlay: "/s/node04/overlay.qcow2".into(),
            config_disk: "/s/node04/config.img".into(),
            serial_log: "/s/node04/vm.log".into(),
            qmp_socket: "/s/node04/qmp.sock".into(),
            agent_socket: "/s/node04/agent.sock".into(),
            pidfile: "/s/node04/qemu.pid".into(),
            forwards: vec![
                PortForward {
                    proto: Proto::Tcp,
                    host: 40122,
                    guest: 22,
                },
                PortForward {
                    proto: Proto::Tcp,
                    host: 40180,
                    guest: 8080,
                },
                PortForward {
                    proto: Proto::Udp,
                    host: 40153,
                    guest: 53,
                },
            ],
            host_mac: "52:54:00:00:00:04".into(),
            fabric_mac: "52:54:00:4d:00:04".into(),
            fabric: Link::Hub {
                group: "230.0.77.1".into(),
                port: 21000,
            },
            machine_id: "0123".into(),
            incoming: None,
            store: None,
        }
    }

    #[test]
    fn a_restore_adds_only_the_incoming_state() {
        let cold = qemu_args(&config(Accel::Tcg));
        assert!(after(&cold, "-incoming").is_empty());
        let mut c = config(Accel::Tcg);
        c.incoming = Some("/s/snap/it's/memory.bin".into());
        let warm = qemu_args(&c);
        assert_eq!(
            after(&warm, "-incoming"),
            [r"exec:cat '/s/snap/it'\''s/memory.bin'"]
        );
        assert_eq!(warm[..cold.len()], cold[..], "same machine, same devices");
        c.incoming = Some("/s/snap/n/memory.bin.zst".into());
        assert_eq!(
            after(&qemu_args(&c), "-incoming"),
            ["exec:zstd -dc '/s/snap/n/memory.bin.zst'"]
        );
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_store_booted_node_gets_the_store_read_only_and_nothing_else_changes() {
        let disk = qemu_args(&config(Accel::Tcg));
        assert!(after(&disk, "-virtfs").is_empty());
        let mut c = config(Accel::Tcg);
        c.store = Some("/nix/store".into());
        let store = qemu_args(&c);
        assert_eq!(
            after(&store, "-virtfs"),
            ["local,path=/nix/store,security_model=none,mount_tag=nix-store,readonly=on"]
        );
        assert_eq!(store.len(), disk.len() + 2);
    }

    #[test]
    fn forwards_bind_loopback_only() {
        let args = qemu_args(&config(Accel::Tcg));
        let net = after(&args, "-netdev");
        assert!(
            net[0].contains("hostfwd=tcp:127.0.0.1:40122-:22"),
            "{net:?}"
        );
        assert!(
            net[0].contains("hostfwd=tcp:127.0.0.1:40180-:8080"),
            "{net:?}"
        );
        assert!(
            net[0].contains("hostfwd=udp:127.0.0.1:40153-:53"),
            "{net:?}"
        );
        assert!(!net[0].contains("0.0.0.0"));
        assert_eq!(
            net[1],
            "socket,id=fabric,mcast=230.0.77.1:21000,localaddr=127.0.0.1"
        );
    }

    #[test]
    fn accel_selects_cpu_model() {
        let tcg = qemu_args(&config(Accel::Tcg));
        assert_eq!(after(&tcg, "-accel"), ["tcg"]);
        assert_eq!(after(&tcg, "-cpu"), ["qemu64,-svm"]);
        let kvm = qemu_args(&config(Accel::Kvm));
        assert_eq!(after(&kvm, "-accel"), ["kvm"]);
        assert_eq!(after(&kvm, "-cpu"), ["host"]);
    }

    #[test]
    fn console_goes_to_the_node_log_and_qmp_to_its_socket() {
        let args = qemu_args(&config(Accel::Tcg));
        assert_eq!(after(&args, "-serial"), ["file:/s/node04/vm.log"]);
        assert_eq!(
            after(&args, "-qmp"),
            ["unix:/s/node04/qmp.sock,server=on,wait=off"]
        );
        assert!(after(&args, "-append")[0].contains("console=ttyS0"));
        assert!(after(&args, "-append")[0].ends_with(" init=/nix/store/x-system/init"));
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn the_agent_port_is_a_named_virtio_serial_port_on_a_unix_socket() {
        let args = qemu_args(&config(Accel::Tcg));
        assert_eq!(
            after(&args, "-chardev"),
            ["socket,id=agent,path=/s/node04/agent.sock,server=on,wait=off"]
        );
        let devices = after(&args, "-device");
        assert!(devices.contains(&"virtio-serial-pci,id=vser"));
        assert!(devices.contains(&"virtserialport,bus=vser.0,chardev=agent,name=org.photon.agent"));
        // No network socket for the agent: nothing forwards to it.
        assert!(!after(&args, "-netdev").iter().any(|n| n.contains("agent")));
    }
}
