# Shared by every role script; sourced after node.env and render.sh.
# Helpers: units UNIT... -> started by photon-role.service once the system is up.
units() { printf '%s\n' "$@" >> /run/photon-role-units; }
: > /run/photon-role-units
units prometheus-node-exporter.service
