# The NixOS side of services/: the repository's one copy of every server's
# configuration. `render FILE` gives services/FILE with its tokens filled in
# for one node (the syntax is in services/README.md), as
# images/debian/roles/render.sh does in the Debian guests; tests/services.rs
# proves both give the same text. Builtins only, so CI evaluates it without
# nixpkgs.
#
#   cluster   nix/lib clusterFromToml's result
#   nodeName  this node
#   values    the provider's own values: ZONE_FILE, KEY_FILE, IAM_SECRET_FILE,
#             IAM_WEB_CONFIG, IAM_HASH (each only where a file uses it)
{ cluster, nodeName, values ? { } }:
let
  inherit (builtins) concatLists concatStringsSep elemAt filter head isList length map match replaceStrings split substring;
  dir = ../../services;
  addr = n: cluster.byName.${n}.address;
  controls = cluster.roles.control or [ ];
  primary = if controls == [ ] then "" else head controls;

  lists = {
    ALL_NODES = cluster.nodeNames;
    CONTROL_NODES = controls;
    WORKER_NODES = cluster.roles.worker or [ ];
    OTHER_NODES = filter (n: n != nodeName) cluster.nodeNames;
    SECONDARY_NODES = filter (n: n != primary) controls;
  };
  scalars = {
    CLUSTER_NAME = cluster.name;
    DOMAIN = cluster.domain;
    NODE_NAME = nodeName;
    NODE_ADDR = addr nodeName;
    PRIMARY = primary;
    PRIMARY_ADDR = if primary == "" then "" else addr primary;
  } // values;
  known = [ "CLUSTER_NAME" "DOMAIN" "NODE_NAME" "NODE_ADDR" "PRIMARY" "PRIMARY_ADDR" "ZONE_FILE" "KEY_FILE" "IAM_SECRET_FILE" "IAM_WEB_CONFIG" "IAM_HASH" ];

  has = s: needle: match ".*${needle}.*" s != null;
  members = file: name: lists.${name} or (throw "render: services/${file}: unknown list ${name}");
  item = n: s: replaceStrings [ "%N_ADDR%" "%N%" ] [ (addr n) n ] s;
  # @JOIN:LIST:SEP:ITEM@ -> ITEM for each node of LIST, joined with SEP.
  joins = file: s: concatStringsSep "" (map
    (p:
      if isList p then concatStringsSep (elemAt p 1) (map (n: item n (elemAt p 2)) (members file (head p)))
      else if has p "@JOIN:" then throw "render: services/${file}: malformed @JOIN"
      else p)
    (split "@JOIN:([A-Z_]+):([^:@]*):([^@]*)@" s));
  # @NAME@ -> the value of NAME.
  fill = file: s: concatStringsSep "" (map
    (p:
      if !isList p then p
      else if builtins.elem (head p) known && scalars ? ${head p} then scalars.${head p}
      else throw "render: services/${file}: unknown token @${head p}@")
    (split "@([A-Z][A-Z0-9_]*)@" s));
  # A line starting with @EACH:LIST@ becomes one line per node of LIST.
  line = file: l:
    let each = match "@EACH:([A-Z_]+)@(.*)" l; in
    if each != null then map (n: fill file (joins file (item n (elemAt each 1)))) (members file (head each))
    else if substring 0 6 l == "@EACH:" then throw "render: services/${file}: malformed @EACH"
    else [ (fill file (joins file l)) ];
  lines = text:
    let ls = filter (x: !isList x) (split "\n" text);
    in if ls != [ ] && elemAt ls (length ls - 1) == "" then
      builtins.genList (i: elemAt ls i) (length ls - 1)
    else ls;

  render = file: concatStringsSep "" (map (l: l + "\n")
    (concatLists (map (line file) (lines (builtins.readFile (dir + "/${file}"))))));

  nonEmpty = text: filter (l: l != "" && substring 0 1 l != "#") (lines text);
in
{
  inherit render primary lists scalars;
  isPrimary = nodeName == primary;
  # "KEY=value" lines (an environment file) as an attribute set.
  envVars = text: builtins.listToAttrs (map
    (l: let m = match "([A-Za-z_][A-Za-z0-9_]*)=(.*)" l; in { name = head m; value = elemAt m 1; })
    (nonEmpty text));
  # "key value" lines (redis.conf) as an attribute set.
  settings = text: builtins.listToAttrs (map
    (l: let m = match "([^ ]+) (.*)" l; in { name = head m; value = elemAt m 1; })
    (nonEmpty text));
  # Whitespace-separated words (a flags file) as a list.
  words = text: filter (w: !isList w && w != "") (split "[ \n\t]+" text);
}
