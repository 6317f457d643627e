# storage-node05: CoronaFS node-local export and LightningStor for
# bench-storage (storage-cluster.toml, common.nix). UNVERIFIED (see common.nix).
{ ... }:
{
  services.coronafs.settings.volume = "/var/lib/coronafs/storage-node05.qcow2";
  services.lightningstor.settings.bucketPrefix = "bench-storage-node05";
}
