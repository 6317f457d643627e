# The driver, built from Cargo.lock with nixpkgs' rustPlatform. The wrapper
# puts the host programs it runs on PATH (QEMU, qemu-img, ssh-keygen; mmdebstrap
# and mkfs.ext4 for the Debian image provider).
# UNVERIFIED here: needs nixpkgs, which CI cannot fetch (docs/nix.md).
{ lib
, rustPlatform
, rustc
, pkg-config
, openssl
, zlib
, makeWrapper
, qemu_kvm
, openssh
, e2fsprogs
, zstd
, mmdebstrap
}:
let
  cargo = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  rustVersion = cargo.package.rust-version;
in
# The pinned nixpkgs' Rust must be at least Cargo.toml's rust-version
# (tests/toolchain.rs checks the figure recorded in nix/nixpkgs-rust.json;
# this checks the real one, at eval time).
assert lib.assertMsg (lib.versionAtLeast rustc.version rustVersion)
  "photon-cluster needs Rust >= ${rustVersion} (Cargo.toml rust-version); this nixpkgs has rustc ${rustc.version}: update flake.lock";
rustPlatform.buildRustPackage {
  pname = cargo.package.name;
  version = cargo.package.version;

  # Only what the build reads: the crate, and the profiles, lanes, role
  # scripts and service configuration it embeds with include_str!.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../tests
      ../profiles
      ../checks
      ../images
      ../services
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ pkg-config makeWrapper ];
  buildInputs = [ openssl zlib ];

  # The integration tests boot VMs or need Nix; the flake's unit-tests check
  # runs --lib and --bins only.
  doCheck = false;

  postInstall = ''
    wrapProgram $out/bin/photon-cluster \
      --suffix PATH : ${lib.makeBinPath [ qemu_kvm openssh e2fsprogs zstd mmdebstrap ]}
  '';

  meta = {
    description = "Boot clusters of QEMU VMs from prebuilt images and validate them in lanes";
    mainProgram = "photon-cluster";
    platforms = [ "x86_64-linux" ];
  };
}
