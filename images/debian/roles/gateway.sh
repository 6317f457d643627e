# gateway: nginx as the API gateway in front of the control plane's load
# balancer; prometheus (nightlight) with the remote-write receiver; and the
# auth-integrated pair: prometheus (creditservice) must authenticate to an
# endpoint that demands credentials (IAM: node exporter behind basic auth).
# The configuration itself is in services/ (render: render.sh).
render nginx/gateway.conf > /etc/nginx/sites-enabled/default

# IAM: the node exporter on the gateway demands the cluster's secret, which
# prometheus reads from a file only it (and root) can read.
IAM_WEB_CONFIG=/etc/prometheus/iam-web.yml
IAM_SECRET_FILE=/etc/prometheus/iam-secret
IAM_HASH=$(htpasswd -nbBC 5 creditservice "$IAM_SECRET" | cut -d: -f2)
render prometheus/iam-web.yml > "$IAM_WEB_CONFIG"
flags="$(render prometheus/node-exporter.flags) $(render prometheus/node-exporter-iam.flags)"
echo "ARGS=\"$flags\"" > /etc/default/prometheus-node-exporter
(umask 027 && printf '%s' "$IAM_SECRET" > "$IAM_SECRET_FILE")
chgrp prometheus "$IAM_SECRET_FILE"

render prometheus/prometheus.yml > /etc/prometheus/prometheus.yml
flags=$(render prometheus/prometheus.flags)
echo "ARGS=\"$flags\"" > /etc/default/prometheus
units nginx.service prometheus.service
