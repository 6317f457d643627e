# node01: control plane, bootstrap member of the chainfire/flaredb/iam
# formation, and the node that runs the control-plane services (prismnet,
# flashdns, fiberlb, plasmavmc controller, lightningstor metadata, k8shost).
# UNVERIFIED (see common.nix).
{ config, ... }:
let
  tc = config.photoncloud.testCluster;
in
{
  services.chainfire.settings.bootstrap = true;
  services.flaredb.settings.bootstrap = true;

  services.prismnet = { enable = true; settings.chainfire = tc.chainfireEndpoints; };
  services.flashdns = {
    enable = true;
    settings = { listen = "0.0.0.0:53"; zone = config.photon.cluster.domain; chainfire = tc.chainfireEndpoints; };
  };
  services.fiberlb = { enable = true; settings.chainfire = tc.chainfireEndpoints; };
  services.plasmavmc = { enable = true; settings = { role = "controller"; chainfire = tc.chainfireEndpoints; }; };
  services.lightningstor = { enable = true; settings = { role = "metadata"; flaredb = tc.flaredbEndpoints; }; };
  services.k8shost = { enable = true; settings = { chainfire = tc.chainfireEndpoints; iam = tc.iamEndpoint; }; };
}
