# control plane: etcd (chainfire), redis (flaredb), bind9 (flashdns), haproxy (fiberlb)
primary=${CONTROL_NODES%% *}

# etcd: one member of a raft cluster of every control node. Timeouts are
# generous because guests run under TCG on a shared CPU.
cluster=""
for n in $CONTROL_NODES; do cluster="$cluster${cluster:+,}$n=http://$(addr "$n"):2380"; done
cat > /etc/default/etcd <<EOT
ETCD_NAME=$NODE_NAME
ETCD_DATA_DIR=/var/lib/etcd/photon
ETCD_LISTEN_PEER_URLS=http://$NODE_ADDR:2380
ETCD_LISTEN_CLIENT_URLS=http://0.0.0.0:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$NODE_ADDR:2379
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$NODE_ADDR:2380
ETCD_INITIAL_CLUSTER=$cluster
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=photon-$CLUSTER_NAME
ETCD_HEARTBEAT_INTERVAL=500
ETCD_ELECTION_TIMEOUT=5000
EOT

# redis: the first control node is the primary, the others replicate it.
sed -i -e 's/^bind .*/bind 0.0.0.0/' -e 's/^protected-mode yes/protected-mode no/' \
    /etc/redis/redis.conf
if [ "$NODE_NAME" != "$primary" ]; then
    echo "replicaof $(addr "$primary") 6379" >> /etc/redis/redis.conf
fi

# bind9: authoritative for the cluster domain; secondaries take zone transfers.
zonefile=/var/lib/bind/db.$DOMAIN
if [ "$NODE_NAME" = "$primary" ]; then
    {
        echo "\$TTL 60"
        echo "@ IN SOA $primary.$DOMAIN. hostmaster.$DOMAIN. (1 60 30 600 60)"
        for n in $CONTROL_NODES; do echo "@ IN NS $n.$DOMAIN."; done
        for n in $ALL_NODES; do echo "$n IN A $(addr "$n")"; done
        echo "api IN A $(addr "$primary")"
    } > "$zonefile"
    notify=""
    for n in $CONTROL_NODES; do [ "$n" = "$primary" ] || notify="$notify $(addr "$n");"; done
    cat > /etc/bind/named.conf.local <<EOT
zone "$DOMAIN" { type primary; file "$zonefile"; allow-transfer { any; }; also-notify {$notify }; };
EOT
else
    cat > /etc/bind/named.conf.local <<EOT
zone "$DOMAIN" { type secondary; file "$zonefile"; primaries { $(addr "$primary"); }; };
EOT
fi
sed -i 's/dnssec-validation auto;/dnssec-validation no; recursion no;/' /etc/bind/named.conf.options

# haproxy: the load balancer in front of the workers' web backends, with its
# runtime API on a unix socket and on TCP 9999 for the lanes.
{
    cat <<EOT
global
    log /dev/log local0
    stats socket /run/haproxy/admin.sock mode 660 level admin
    stats socket ipv4@0.0.0.0:9999 level admin
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind :80
    default_backend workers
backend workers
    balance roundrobin
    option httpchk GET /healthz
EOT
    for n in $WORKER_NODES; do echo "    server $n $(addr "$n"):8080 check inter 2s"; done
    cat <<EOT
listen stats
    bind :8404
    stats enable
    stats uri /stats
EOT
} > /etc/haproxy/haproxy.cfg

units etcd.service redis-server.service named.service haproxy.service
