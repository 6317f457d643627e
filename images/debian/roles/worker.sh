# workers: a web backend behind the load balancer, a volume exported over NBD
# (coronafs), and qemu for nested guests (plasmavmc).
cat > /etc/nginx/sites-enabled/default <<EOT
server {
    listen 8080 default_server;
    location /healthz { return 200 "ok\n"; }
    location / { return 200 "photon web backend $NODE_NAME\n"; }
}
EOT
units nginx.service photon-volume-export.service
