# storage nodes: a volume exported over NBD (coronafs part) and fio, as
# images/debian/roles/storage.sh. UNVERIFIED (needs nixpkgs; docs/nix.md).
{ ... }:
{
  imports = [ ./volume-export.nix ];
}
