# The guest agent (src/agent/, the `photon-agent` binary) alone, for the
# NixOS roles: the package's second binary, built without the driver's
# wrapper, so a guest's closure holds the agent and glibc, not QEMU and the
# driver's host tools.
# UNVERIFIED here: needs nixpkgs, which CI cannot fetch (docs/nix.md).
{ callPackage }:
(callPackage ./package.nix { }).overrideAttrs (old: {
  pname = "photon-agent";
  name = "photon-agent-${old.version}";
  # cargoBuildHook passes these to `cargo build`; cargoInstallHook installs
  # the binaries the build made, so only bin/photon-agent.
  cargoBuildFlags = [ "--bin" "photon-agent" ];
  postInstall = "";
  meta = old.meta // {
    description = "photon-cluster's guest agent: the driver's control channel on virtio-serial";
    mainProgram = "photon-agent";
  };
})
