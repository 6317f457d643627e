# Convenience targets. The Nix ones need a Nix with flakes (docs/nix.md).
NIX ?= nix --extra-experimental-features 'nix-command flakes'

.PHONY: cluster-smoke test nix-lib-test nix-check

# The seed's publishable verification: clean host build, boot, every layer.
cluster-smoke:
	$(NIX) run ./nix/test-cluster#cluster -- fresh-smoke

# The whole suite (boots the reference cluster).
test:
	bash scripts/test.sh

# The builtins-only Nix library: pure tests, instantiation, parse of every .nix.
nix-lib-test:
	cargo test --test nix_lib

# One real check derivation, built with builtins-only Nix (docs/nix.md, "CI").
# IMAGES defaults to the newest Debian image build under the state directory.
IMAGES ?= $(shell ls -td $${PHOTON_VM_DIR:-$$HOME/.photoncloud-test-cluster}/images/*/ 2>/dev/null | head -1)
nix-check:
	cargo build
	nix-build nix/ci/check.nix \
	  --arg driver "$(CURDIR)/target/debug/photon-cluster" \
	  --argstr images "$(IMAGES:/=)" \
	  --option sandbox false \
	  --option system-features "kvm nixos-test benchmark big-parallel" \
	  --option build-users-group "" \
	  --out-link work/nix-fresh-smoke
