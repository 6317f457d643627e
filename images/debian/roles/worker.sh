# workers: a web backend behind the load balancer, a volume exported over NBD
# (coronafs), and qemu for nested guests (plasmavmc). The web backend's
# configuration is in services/ (render: render.sh).
render nginx/backend.conf > /etc/nginx/sites-enabled/default
units nginx.service photon-volume-export.service

# prismnet: Open vSwitch plus ovn-controller, a chassis of the OVN cluster
# whose databases run on the first control node (roles/control.sh).
cat > /etc/default/photon-ovn-chassis <<EOT
OVN_SYSTEM_ID=$NODE_NAME
OVN_REMOTE=tcp:$PRIMARY_ADDR:6642
OVN_ENCAP_IP=$NODE_ADDR
EOT
units openvswitch-switch.service photon-ovn-chassis.service ovn-host.service
