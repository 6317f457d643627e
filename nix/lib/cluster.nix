# Cluster definitions (profiles/*.toml) and lanes (checks/*.toml), read with
# builtins.fromTOML. Pure functions: CI evaluates and tests them without
# nixpkgs (nix/lib/tests.nix). The Rust driver stays the authority on the
# formats (docs/cluster-format.md, docs/adding-a-check.md); these helpers read
# the same files so Nix code can name nodes, roles and lanes without
# restating them, and catch a lane whose targets do not exist at eval time.
# A lane is read only as far as that needs (names, layers, kinds, targets);
# its check ids are the driver's (`photon-cluster plan --json`, compared in
# tests/nix_lib.rs).
{ util }:
let
  inherit (util) concatMap unique duplicates toList;

  knownRoles = [ "control" "worker" "gateway" "storage" ];

  # A path (./profiles/reference.toml), a string path, or an already parsed attrset.
  readToml = src:
    if builtins.isAttrs src then src
    else builtins.fromTOML (builtins.readFile src);

  describeSource = src: if builtins.isAttrs src then "<attrset>" else toString src;

  node = raw: {
    name = raw.name or null;
    role = raw.role or null;
    address = raw.address or null;
    memoryMiB = raw.memory_mib or 1024;
    vcpus = raw.vcpus or 1;
    dependsOn = raw.depends_on or [ ];
    units = raw.units or [ ];
    forwards = map
      (f: {
        name = f.name;
        guest = f.guest;
        proto = f.proto or "tcp";
        host = f.host or null;
      })
      (raw.forward or [ ]);
  };

  clusterErrors = c:
    let
      names = map (n: n.name) c.nodes;
      missing = concatMap
        (i:
          let n = builtins.elemAt c.nodes i; in
          concatMap (field: if n.${field} == null then [ "node[${toString i}].${field}: missing" ] else [ ])
            [ "name" "role" "address" ])
        (builtins.genList (i: i) (builtins.length c.nodes));
      badRoles = concatMap
        (n: if n.role != null && !(builtins.elem n.role knownRoles)
        then [ "node ${toString n.name}: unknown role \"${n.role}\" (expected one of: ${builtins.concatStringsSep ", " knownRoles})" ]
        else [ ])
        c.nodes;
      badDeps = concatMap
        (n: concatMap
          (d: if builtins.elem d names then [ ] else [ "node ${toString n.name}: depends_on names unknown node \"${d}\"" ])
          n.dependsOn)
        c.nodes;
    in
    (if c.nodes == [ ] then [ "no [[node]] entries" ] else [ ])
    ++ missing
    ++ map (d: "duplicate node name \"${toString d}\"") (duplicates names)
    ++ map (d: "duplicate node address \"${toString d}\"") (duplicates (map (n: n.address) c.nodes))
    ++ badRoles
    ++ badDeps;
in
rec {
  inherit knownRoles;

  # The cluster definition as a plain attrset (JSON-printable: no functions).
  #   { name, stateSuffix, domain, subnet, image, nodes, nodeNames, roles,
  #     byName, source, errors }
  # roles maps each role present to its node names, in file order.
  # errors lists what is wrong (empty when valid); see checkCluster.
  clusterFromToml = src:
    let
      raw = readToml src;
      nodes = map node (raw.node or [ ]);
      c = {
        source = describeSource src;
        name = raw.cluster.name or null;
        stateSuffix = raw.cluster.state_suffix or "";
        domain = raw.network.domain or null;
        subnet = raw.network.subnet or null;
        image = raw.image or { };
        inherit nodes;
        nodeNames = map (n: n.name) nodes;
        roles = builtins.listToAttrs (concatMap
          (role:
            let members = builtins.filter (n: n.role == role) nodes; in
            if members == [ ] then [ ] else [{ name = role; value = map (n: n.name) members; }])
          (unique (map (n: n.role) (builtins.filter (n: n.role != null) nodes))));
        byName = builtins.listToAttrs (map (n: { name = toString n.name; value = n; })
          (builtins.filter (n: n.name != null) nodes));
      };
    in
    c // { errors = clusterErrors c; };

  # The cluster, or an evaluation error listing every problem.
  checkCluster = c:
    if c.errors == [ ] then c
    else throw "cluster ${c.source}: ${builtins.concatStringsSep "; " c.errors}";

  # A lane file, read only as far as evaluation needs it: the lane's name,
  # its layers, and each check's name, kind and targets (for the check ids
  # and the eval-time target check). Everything else in a check (members,
  # deadline, ports, ...) is the driver's to interpret and is not read here:
  #   { name, description, source, layers = [ { name, description, checks } ],
  #     layerNames, checks = [ { layer, name, kind, targets } ] }
  # targets is kept raw (string, list or null); see resolveTargets.
  laneFromToml = src:
    let
      raw = readToml src;
      layers = map
        (l: {
          name = l.name or null;
          description = l.description or "";
          checks = map
            (ch: {
              name = ch.name or null;
              kind = ch.kind or null;
              targets = ch.targets or null;
            })
            (l.check or [ ]);
        })
        (raw.layer or [ ]);
    in
    {
      source = describeSource src;
      name = raw.lane.name or null;
      description = raw.lane.description or "";
      inherit layers;
      layerNames = map (l: l.name) layers;
      checks = concatMap (l: map (ch: ch // { layer = l.name; }) l.checks) layers;
    };

  # One target ("all", "role:<role>", a node name) or a list of them, to node
  # names the way the driver expands them (src/lane.rs expand_targets): each
  # item in turn, its nodes in cluster order, a node named twice kept once.
  # { nodes = [..]; errors = [..]; }: never throws.
  resolveTargetsChecked = cluster: target:
    let
      one = t:
        if t == "all" then { nodes = cluster.nodeNames; errors = [ ]; }
        else if util.hasPrefix "role:" t then
          let role = builtins.substring 5 (builtins.stringLength t) t; in
          if !(builtins.elem role knownRoles) then
            { nodes = [ ]; errors = [ "target \"${t}\": unknown role \"${role}\"" ]; }
          else if !(cluster.roles ? ${role}) then
            { nodes = [ ]; errors = [ "target \"${t}\": cluster ${toString cluster.name} has no ${role} nodes" ]; }
          else { nodes = cluster.roles.${role}; errors = [ ]; }
        else if builtins.elem t cluster.nodeNames then { nodes = [ t ]; errors = [ ]; }
        else { nodes = [ ]; errors = [ "target \"${toString t}\": no such node in cluster ${toString cluster.name}" ]; };
      parts = map one (toList target);
    in
    {
      nodes = builtins.foldl' (acc: p: acc ++ builtins.filter (n: !(builtins.elem n acc)) p.nodes) [ ] parts;
      errors = concatMap (p: p.errors) parts;
    };

  # Node names a target selects; an evaluation error if any part is unknown.
  resolveTargets = cluster: target:
    let r = resolveTargetsChecked cluster target; in
    if r.errors == [ ] then r.nodes
    else throw (builtins.concatStringsSep "; " r.errors);

  # What evaluation can tell is wrong with running `lane` against `cluster`
  # (empty list: fine): a lane without a name, duplicate layers, a check
  # without a name, targets naming no node. The driver checks the rest.
  validateLane = cluster: lane:
    let
      checkErrors = ch:
        let where = "layer ${toString ch.layer}, check ${toString ch.name}"; in
        (if ch.name == null then [ "layer ${toString ch.layer}: a check has no name" ] else [ ])
        ++ (if ch.targets == null then [ ]
        else map (e: "${where}: targets: ${e}") (resolveTargetsChecked cluster ch.targets).errors);
    in
    (if lane.name == null then [ "lane ${lane.source}: no [lane] name" ] else [ ])
    ++ map (d: "duplicate layer \"${toString d}\"") (duplicates lane.layerNames)
    ++ concatMap checkErrors lane.checks;

  # The lane, or an evaluation error listing every problem.
  checkLane = cluster: lane:
    let errs = validateLane cluster lane; in
    if errs == [ ] then lane
    else throw "lane ${toString lane.name} (${lane.source}) against cluster ${toString cluster.name}: ${builtins.concatStringsSep "; " errs}";

  # The lane's checks expanded per target node, with the driver's ids (its
  # `plan --json`): a check with targets becomes one <name>@<node> per node
  # its targets select, even when that is a single node; a check without
  # targets (e.g. kind = "image") runs once, as <name>.
  #   [ { id, layer, name, kind, target } ]   target: a node name or null
  laneChecks = cluster: lane:
    concatMap
      (ch:
        if ch.targets == null then [{ id = ch.name; inherit (ch) layer name kind; target = null; }]
        else map (n: { id = "${ch.name}@${n}"; inherit (ch) layer name kind; target = n; }) (resolveTargets cluster ch.targets))
      (checkLane cluster lane).checks;

  # Nodes the lane's checks target, in cluster order.
  laneNodes = cluster: lane:
    let targeted = concatMap (c: if c.target == null then [ ] else [ c.target ]) (laneChecks cluster lane); in
    builtins.filter (n: builtins.elem n targeted) cluster.nodeNames;
}
