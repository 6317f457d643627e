#!/bin/sh
# Turns the freshly installed Debian tree at $1 into the shared base image;
# $2 is the nested-guest kit's init (images/nested/init), $3 the S3 server
# binary (s3s-fs, built by scripts/host-deps.sh; src/image/debian.rs), $4 the
# guest agent (the photon-agent binary, src/agent.rs).
# Runs on the host as mmdebstrap's customize hook; part of the recipe hash.
#
# The image is identical for every node and every cluster. Node identity
# (hostname, addresses, SSH keys, role configuration) arrives at boot on a
# small config disk (/dev/vdb, mounted at /photon) and is applied by
# photon-firstboot.service before the network and sshd start.
set -eu
root="$1"
in_root() { chroot "$root" "$@"; }

# An initrd that loads virtio and ext4 only: small, so it unpacks fast under TCG.
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
printf '%s\n' virtio_ring virtio virtio_pci virtio_blk virtio_net ext4 \
    > "$root/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >/dev/null

# Servers start only when a node's role asks for them (see roles/*.sh).
for unit in etcd redis-server named haproxy nginx prometheus \
    prometheus-node-exporter openvswitch-switch ovs-vswitchd ovsdb-server \
    ovs-record-hostname ovn-central ovn-northd ovn-ovsdb-server-nb \
    ovn-ovsdb-server-sb ovn-host ovn-controller podman podman-restart; do
    in_root systemctl disable "$unit.service" >/dev/null 2>&1 || true
done
# Timers and jobs that only steal CPU from a short-lived test guest.
for unit in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer \
    fstrim.timer e2scrub_reap.service prometheus-node-exporter-apt.timer \
    prometheus-node-exporter-smartmon.timer prometheus-node-exporter-nvme.timer \
    prometheus-node-exporter-ipmitool-sensor.timer prometheus-node-exporter-mellanox-hca-temp.timer \
    podman-auto-update.timer podman-auto-update.service podman.socket; do
    in_root systemctl mask "$unit" >/dev/null 2>&1 || true
done

# Boot-time units a test guest does not need; each costs seconds under TCG.
# (systemd-logind starts once dbus is installed, for podman: over a minute at
# boot under TCG, and nobody logs in on a console here.)
for unit in systemd-binfmt.service dev-hugepages.mount dev-mqueue.mount \
    sys-kernel-debug.mount sys-kernel-tracing.mount systemd-pstore.service \
    modprobe@dm_mod.service modprobe@efi_pstore.service modprobe@fuse.service \
    modprobe@loop.service systemd-network-generator.service systemd-logind.service; do
    in_root systemctl mask "$unit" >/dev/null 2>&1 || true
done

# QMP system_powerdown presses the ACPI power button; without logind (no
# dbus in a minimal image) acpid turns it into a clean poweroff.
mkdir -p "$root/etc/acpi/events"
printf 'event=button/power.*\naction=/sbin/poweroff\n' > "$root/etc/acpi/events/photon-powerbtn"
in_root systemctl enable acpid.service >/dev/null 2>&1 || true

# Host keys come from the config disk, one per node and cluster, so the
# driver knows them in advance and can verify every connection.
rm -f "$root"/etc/ssh/ssh_host_*
cat > "$root/etc/ssh/sshd_config.d/photon.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
EOF

# The config disk.
mkdir -p "$root/photon"
cat > "$root/etc/fstab" <<'EOF'
/dev/vda  /        ext4  rw,noatime  0 1
/dev/vdb  /photon  ext4  ro,x-systemd.device-timeout=0  0 0
EOF

cat > "$root/usr/local/sbin/photon-firstboot" <<'EOF'
#!/bin/sh
# Applies this node's identity from the config disk, then its role.
set -eu
C=/photon
. "$C/node.env"
echo "$NODE_NAME" > /etc/hostname
hostname "$NODE_NAME"
cp "$C/hosts" /etc/hosts
install -d -m 700 /root/.ssh
install -m 600 "$C/authorized_keys" /root/.ssh/authorized_keys
install -m 600 "$C/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 644 "$C/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
mkdir -p /run/systemd/network
cp "$C"/network/*.network /run/systemd/network/
if [ -f "$C/role.sh" ]; then
    sh "$C/role.sh"
fi
echo "photon-firstboot: $NODE_NAME configured as $NODE_ROLE"
EOF
chmod 755 "$root/usr/local/sbin/photon-firstboot"

cat > "$root/etc/systemd/system/photon-firstboot.service" <<'EOF'
[Unit]
Description=Apply node identity and role from the photon config disk
DefaultDependencies=no
RequiresMountsFor=/photon
After=systemd-remount-fs.service
Before=sysinit.target network-pre.target systemd-networkd.service ssh.service
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/photon-firstboot
StandardOutput=journal+console

[Install]
WantedBy=sysinit.target
EOF
in_root systemctl enable photon-firstboot.service systemd-networkd.service >/dev/null 2>&1
# The role script starts its servers once the system is up.
cat > "$root/etc/systemd/system/photon-role.service" <<'EOF'
[Unit]
Description=Start the servers of this node's role
After=photon-firstboot.service network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'exec systemctl start --no-block $(cat /run/photon-role-units)'

[Install]
WantedBy=multi-user.target
EOF
in_root systemctl enable photon-role.service >/dev/null 2>&1
# network-online must not wait for the slirp NIC's carrier games.
mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat > "$root/etc/systemd/system/systemd-networkd-wait-online.service.d/photon.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=20
EOF

# A quiet, fast journal that survives for collection.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n' \
    > "$root/etc/systemd/journald.conf.d/photon.conf"

# The nested-guest kit: the image's own kernel plus a busybox initramfs whose
# init ($2, images/nested/init, shared with the NixOS worker role) prints a
# marker, for workers to boot with qemu inside the guest.
kit="$root/usr/local/share/photon/nested"
mkdir -p "$kit/initramfs/bin"
cp "$root"/boot/vmlinuz-* "$kit/vmlinuz"
cp "$root/bin/busybox" "$kit/initramfs/bin/busybox"
cp "$2" "$kit/initramfs/init"
chmod 755 "$kit/initramfs/init"
(cd "$kit/initramfs" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$kit/initramfs.gz")
rm -rf "$kit/initramfs"

# The coronafs part: a qcow2 volume exported over NBD by qemu-storage-daemon.
cat > "$root/etc/systemd/system/photon-volume-export.service" <<'EOF'
[Unit]
Description=Export a node-local volume over NBD (coronafs part)
After=network-online.target

[Service]
StateDirectory=photon
ExecStartPre=/bin/sh -c 'test -e /var/lib/photon/volume.qcow2 || qemu-img create -q -f qcow2 /var/lib/photon/volume.qcow2 1G'
ExecStart=/usr/bin/qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename=/var/lib/photon/volume.qcow2 \
    --blockdev driver=qcow2,node-name=vol0,file=file0 \
    --nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809 \
    --export type=nbd,id=exp0,node-name=vol0,name=vol0,writable=on
Restart=on-failure
EOF

# The LightningStor part: an S3 server (s3s-fs) over a directory, one
# subdirectory per bucket. Credentials and the bucket list come from the
# config disk's node.env (S3_ACCESS_KEY, S3_SECRET: per cluster, redacted
# from the artifacts; S3_BUCKETS: src/provision.rs). Started by roles that
# list it (roles/storage.sh).
install -m 755 "$3" "$root/usr/local/bin/s3s-fs"
cat > "$root/etc/systemd/system/photon-s3.service" <<'EOF'
[Unit]
Description=S3 object storage over a directory (s3s-fs, LightningStor part)
After=network-online.target
RequiresMountsFor=/photon

[Service]
StateDirectory=photon/s3
EnvironmentFile=/photon/node.env
ExecStartPre=/bin/sh -c 'for b in $$S3_BUCKETS; do mkdir -p "/var/lib/photon/s3/$$b"; done'
ExecStart=/usr/local/bin/s3s-fs --host 0.0.0.0 --port 9000 \
    --access-key ${S3_ACCESS_KEY} --secret-key ${S3_SECRET} /var/lib/photon/s3
Restart=on-failure
EOF

# The PrismNet part: a worker joins OVN as a chassis named like the node,
# tunnelling Geneve from its fabric address to the southbound database on the
# first control node. roles/worker.sh writes the values; ovn-controller
# (ovn-host) picks them up from the local Open vSwitch database.
cat > "$root/etc/systemd/system/photon-ovn-chassis.service" <<'EOF'
[Unit]
Description=Register this node as an OVN chassis (PrismNet part)
After=ovsdb-server.service
Requires=ovsdb-server.service
Before=ovn-controller.service

[Service]
Type=oneshot
RemainAfterExit=yes
EnvironmentFile=/etc/default/photon-ovn-chassis
ExecStart=/usr/bin/ovs-vsctl --no-wait set open . external_ids:system-id=${OVN_SYSTEM_ID} \
    external_ids:ovn-remote=${OVN_REMOTE} external_ids:ovn-encap-type=geneve \
    external_ids:ovn-encap-ip=${OVN_ENCAP_IP}
EOF

# Every node gets its own id from the kernel command line (systemd.machine_id=);
# a fixed one here keeps systemd from treating each boot as a first boot,
# which would re-apply presets and enable every server on every node.
rm -f "$root/usr/sbin/policy-rc.d"
echo 70686f746f6e2d636c75737465720001 > "$root/etc/machine-id"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

# The driver's control channel (docs/architecture.md, "Guest channel"): an
# agent on the virtio-serial port org.photon.agent ($4, src/agent.rs), up
# before the network and sshd, so the driver can run commands the moment the
# guest's early boot is done. Restarted at once if it ends: a killed agent
# costs the driver one broken channel, not the node.
install -m 755 "$4" "$root/usr/local/sbin/photon-agent"
cat > "$root/etc/systemd/system/photon-agent.service" <<'EOF2'
[Unit]
Description=photon driver control channel (virtio-serial org.photon.agent)
DefaultDependencies=no
After=systemd-udevd.service
Before=network-pre.target ssh.service sysinit.target shutdown.target
Conflicts=shutdown.target

[Service]
ExecStart=/usr/local/sbin/photon-agent
# What a command started in the background (a check's socat) outlives a
# restart of the agent, as it outlives an SSH session's end.
KillMode=process
Restart=always
RestartSec=100ms

[Install]
WantedBy=sysinit.target
EOF2
in_root systemctl enable photon-agent.service >/dev/null
