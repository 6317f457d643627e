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
if [ "$NODE_NAME" = "$PRIMARY" ]; then
    render bind/db.zone > "$ZONE_FILE"
    render bind/primary.conf > /etc/bind/named.conf.local
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

units etcd.service redis-server.service named.service haproxy.service
