# The nested-guest kit (/usr/local/share/photon/nested) for the NixOS worker
# role, built from the same init as the Debian image's (images/nested/init):
# a kernel, and an initramfs holding a static busybox and that init. The
# `nested` check boots it with qemu inside the worker and waits for the
# init's marker (src/check/nested_guest.rs).
#
# Builtins only, so that CI builds it for real in the Nix sandbox with
# Debian's static busybox (tests/nix_lib.rs boots the result under QEMU);
# nix/roles/worker.nix passes nixpkgs' static busybox and the node's kernel.
{ system ? "x86_64-linux"
  # A directory with a static busybox at bin/busybox (its applets are used
  # by the builder: sh, mkdir, cp, chmod, find, cpio, gzip).
, busybox
  # The kernel image to boot inside the worker (a bzImage).
, kernel
, init ? ../images/nested/init
}:
derivation {
  name = "photon-nested-kit";
  inherit system kernel init;
  busybox = "${busybox}/bin/busybox";
  builder = "${busybox}/bin/busybox";
  args = [
    "sh"
    "-euc"
    ''
      bb=$busybox
      $bb mkdir -p $out initramfs/bin
      $bb cp $kernel $out/vmlinuz
      $bb cp $bb initramfs/bin/busybox
      $bb cp $init initramfs/init
      $bb chmod 755 initramfs/init initramfs/bin/busybox
      cd initramfs
      $bb find . | $bb cpio -o -H newc | $bb gzip -1 > $out/initramfs.gz
    ''
  ];
}
