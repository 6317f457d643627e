# Shared by every role script; sourced, with node.env already loaded.
# Helpers: addr NAME -> the node's address from /etc/hosts.
addr() { getent hosts "$1" | awk '{print $1; exit}'; }
units() { printf '%s\n' "$@" >> /run/photon-role-units; }
: > /run/photon-role-units
units prometheus-node-exporter.service
