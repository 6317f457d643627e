# control plane: etcd (chainfire), redis (flaredb), bind9 (flashdns), haproxy
# (fiberlb). The configuration itself is in services/ (render: render.sh).

# etcd: one member of a raft cluster of every control node.
render etcd/etcd.env > /etc/default/etcd

# redis: Debian's stock config, then ours, included last so that it wins; the
# first control node is the primary, the others replicate it.
{
    render redis/redis.conf
    [ "$NODE_NAME" = "$PRIMARY" ] || render redis/replica.conf
} > /etc/redis/photon.conf
grep -qx 'include /etc/redis/photon.conf' /etc/redis/redis.conf ||
    echo 'include /etc/redis/photon.conf' >> /etc/redis/redis.conf

# bind9: authoritative for the cluster domain; secondaries take zone transfers.
ZONE_FILE=/var/lib/bind/db.$DOMAIN
KEY_FILE=/etc/bind/photon-update.key
if [ "$NODE_NAME" = "$PRIMARY" ]; then
    render bind/db.zone > "$ZONE_FILE"
    chown bind:bind "$ZONE_FILE"  # named writes dynamic updates back
    render bind/primary.conf > /etc/bind/named.conf.local
    # The TSIG key that may update the zone (RFC 2136), per cluster from
    # node.env; the hex string is used as the key's base64 text as it is.
    printf 'key "photon-update" { algorithm hmac-sha256; secret "%s"; };\n' "$DNS_TSIG_SECRET" \
        > "$KEY_FILE"
    chown root:bind "$KEY_FILE"
    chmod 640 "$KEY_FILE"
else
    render bind/secondary.conf > /etc/bind/named.conf.local
fi
# Our options replace the stock dnssec-validation line.
render bind/options.conf > /run/photon-named-options
sed -i -e '/dnssec-validation auto;/{' -e 'r /run/photon-named-options' -e 'd' -e '}' \
    /etc/bind/named.conf.options
rm -f /run/photon-named-options

# haproxy: the load balancer in front of the workers' web backends.
render haproxy/haproxy.cfg > /etc/haproxy/haproxy.cfg

# haproxy also loads every listener published at runtime
# (/etc/haproxy/listeners.d/*.cfg, src/check/lb_listener.rs).
mkdir -p /etc/haproxy/listeners.d
echo 'EXTRAOPTS="-S /run/haproxy-master.sock -f /etc/haproxy/listeners.d"' >> /etc/default/haproxy

units etcd.service redis-server.service named.service haproxy.service

# prismnet: the OVN northbound and southbound databases and ovn-northd, on
# the first control node only (docs/lanes.md says why not a raft of three),
# reachable over TCP from the workers' ovn-controller and the lanes.
if [ "$NODE_NAME" = "$PRIMARY" ]; then
    echo 'OVN_CTL_OPTS="--db-nb-create-insecure-remote=yes --db-sb-create-insecure-remote=yes"' \
        > /etc/default/ovn-central
    units ovn-central.service
fi
