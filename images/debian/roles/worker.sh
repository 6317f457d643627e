# workers: a web backend behind the load balancer, a volume exported over NBD
# (coronafs), and qemu for nested guests (plasmavmc). The web backend's
# configuration is in services/ (render: render.sh).
render nginx/backend.conf > /etc/nginx/sites-enabled/default
units nginx.service photon-volume-export.service
