# gateway: nginx as the API gateway in front of the control plane's load
# balancer; prometheus (nightlight) with the remote-write receiver; and the
# auth-integrated pair: prometheus (creditservice) must authenticate to an
# endpoint that demands credentials (IAM: node exporter behind basic auth).
upstream=""
for n in $CONTROL_NODES; do upstream="$upstream    server $(addr "$n"):80;
"; done
cat > /etc/nginx/sites-enabled/default <<EOT
upstream control_plane {
$upstream}
server {
    listen 80 default_server;
    location = /healthz { return 200 "gateway ok\n"; }
    location /metrics/ { proxy_pass http://127.0.0.1:9090/; }
    location / { proxy_pass http://control_plane; }
}
EOT

# IAM: the node exporter on the gateway demands a password.
hash=$(htpasswd -nbBC 5 creditservice "$IAM_SECRET" | cut -d: -f2)
cat > /etc/prometheus/iam-web.yml <<EOT
basic_auth_users:
  creditservice: '$hash'
EOT
echo 'ARGS="--web.config.file=/etc/prometheus/iam-web.yml"' > /etc/default/prometheus-node-exporter

targets=""
for n in $ALL_NODES; do [ "$n" = "$NODE_NAME" ] || targets="$targets'$n:9100', "; done
cat > /etc/prometheus/prometheus.yml <<EOT
global:
  scrape_interval: 5s
  evaluation_interval: 5s
scrape_configs:
  - job_name: nodes
    static_configs:
      - targets: [${targets%, }]
  - job_name: creditservice-iam
    basic_auth:
      username: creditservice
      password: '$IAM_SECRET'
    static_configs:
      - targets: ['$NODE_NAME:9100']
EOT
echo 'ARGS="--web.enable-remote-write-receiver --storage.tsdb.retention.time=1d"' > /etc/default/prometheus
units nginx.service prometheus.service
