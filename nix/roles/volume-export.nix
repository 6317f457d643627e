# A node-local volume exported over NBD by qemu-storage-daemon (coronafs
# part), as photon-volume-export.service in images/debian/customize.sh.
{ pkgs, ... }:
{
  systemd.services.photon-volume-export = {
    description = "Export a node-local volume over NBD (coronafs part)";
    wantedBy = [ "multi-user.target" ];
    after = [ "network-online.target" ];
    wants = [ "network-online.target" ];
    serviceConfig = {
      StateDirectory = "photon";
      ExecStartPre = "${pkgs.runtimeShell} -c 'test -e /var/lib/photon/volume.qcow2 || ${pkgs.qemu-utils}/bin/qemu-img create -q -f qcow2 /var/lib/photon/volume.qcow2 1G'";
      ExecStart = builtins.concatStringsSep " " [
        "${pkgs.qemu-utils}/bin/qemu-storage-daemon"
        "--blockdev driver=file,node-name=file0,filename=/var/lib/photon/volume.qcow2"
        "--blockdev driver=qcow2,node-name=vol0,file=file0"
        "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809"
        "--export type=nbd,id=exp0,node-name=vol0,name=vol0,writable=on"
      ];
      Restart = "on-failure";
    };
  };
  environment.systemPackages = [ pkgs.fio pkgs.qemu-utils ];
}
