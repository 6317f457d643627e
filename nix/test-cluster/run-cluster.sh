#!/usr/bin/env bash
# The PhotonCloud test cluster's entry point, with the seed's commands:
#
#   run-cluster.sh build | start | status | ssh node04 | stop | clean
#   run-cluster.sh smoke | fresh-smoke | validate
#   run-cluster.sh matrix | fresh-matrix
#   run-cluster.sh bench-storage | fresh-bench-storage (alias fresh-storage-bench)
#   run-cluster.sh provider-vm-reality-proof
#
# It execs photon-cluster with the PhotonCloud cluster file and, for lanes,
# the lane file from checks/photoncloud/. Used by
#   nix run ./nix/test-cluster#cluster -- fresh-smoke
#   nix develop ./nix/test-cluster -c ./nix/test-cluster/run-cluster.sh smoke
#   make cluster-smoke
# Overrides: PHOTONCLOUD_CLUSTER, PHOTONCLOUD_STORAGE_CLUSTER (cluster files),
# PHOTONCLOUD_LANES (lane directory), PHOTON_CLUSTER (the driver program).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cluster=${PHOTONCLOUD_CLUSTER:-$here/cluster.toml}
storage=${PHOTONCLOUD_STORAGE_CLUSTER:-$here/storage-cluster.toml}
lanes=${PHOTONCLOUD_LANES:-$here/../../checks/photoncloud}
driver=${PHOTON_CLUSTER:-photon-cluster}

lane() {
    local f="$lanes/$1.toml"
    if [ ! -f "$f" ]; then
        echo "run-cluster.sh: no lane file $f (PhotonCloud lanes live in checks/photoncloud/)" >&2
        exit 2
    fi
    lane_file=$f
}

cmd=${1:-}
[ $# -gt 0 ] && shift
target=$cluster
case "$cmd" in
    "" | -h | --help | help)
        sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0 ;;
    smoke | fresh-smoke | validate) lane smoke; sub=$cmd ;;
    matrix) lane matrix; sub=smoke ;;
    fresh-matrix) lane matrix; sub=fresh-smoke ;;
    bench-storage) lane bench-storage; sub=smoke; target=$storage ;;
    fresh-bench-storage | fresh-storage-bench) lane bench-storage; sub=fresh-smoke; target=$storage ;;
    provider-vm-reality-proof) lane provider-vm-reality-proof; sub=fresh-smoke ;;
    *) lane_file=""; sub=$cmd ;;
esac

command -v "$driver" >/dev/null 2>&1 || {
    echo "run-cluster.sh: $driver not on PATH; use 'nix run ./nix/test-cluster#cluster' or 'nix develop ./nix/test-cluster'" >&2
    exit 2
}
if [ -n "$lane_file" ]; then
    exec "$driver" --cluster "$target" "$sub" --lane-file "$lane_file" "$@"
fi
exec "$driver" --cluster "$target" "$sub" "$@"
