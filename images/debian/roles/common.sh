# Shared by every role script; sourced after node.env and render.sh.
# Helpers: units UNIT... -> started by photon-role.service once the system is up.
units() { printf '%s\n' "$@" >> /run/photon-role-units; }
: > /run/photon-role-units
# No systemd collector: with dbus in the image (for podman) it asks systemd
# over D-Bus on every scrape, which costs a TCG guest a third of its CPU.
# (services/prometheus/node-exporter.flags; the gateway adds its own.)
echo "ARGS=\"$(render prometheus/node-exporter.flags)\"" > /etc/default/prometheus-node-exporter
units prometheus-node-exporter.service
