# Cluster definitions (profiles/*.toml) and lanes (checks/*.toml), read with
# builtins.fromTOML. Pure functions: CI evaluates and tests them without
# nixpkgs (nix/lib/tests.nix). The Rust driver stays the authority on the
# formats (docs/cluster-format.md, docs/adding-a-check.md); these helpers read
# the same files so Nix code can name nodes, roles and lanes without
# restating them, and catch a lane whose targets do not exist at eval time.
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

  # A lane file as a plain attrset:
  #   { name, description, source, layers = [ { name, description, checks } ],
  #     checks = [ { layer, name, kind, targets, members } ] }
  # targets/members are kept raw (string or list); see resolveTargets.
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
              members = ch.members or null;
              deadline = ch.deadline or 30;
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
  # names in cluster order. { nodes = [..]; errors = [..]; }: never throws.
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
      wanted = unique (concatMap (p: p.nodes) parts);
    in
    {
      # Cluster order, like the driver.
      nodes = builtins.filter (n: builtins.elem n wanted) cluster.nodeNames;
      errors = concatMap (p: p.errors) parts;
    };

  # Node names a target selects; an evaluation error if any part is unknown.
  resolveTargets = cluster: target:
    let r = resolveTargetsChecked cluster target; in
    if r.errors == [ ] then r.nodes
    else throw (builtins.concatStringsSep "; " r.errors);

  # Everything wrong with running `lane` against `cluster` (empty list: fine).
  validateLane = cluster: lane:
    let
      checkErrors = ch:
        let
          where = "layer ${toString ch.layer}, check ${toString ch.name}";
          field = f: v:
            if v == null then [ ]
            else map (e: "${where}: ${f}: ${e}") (resolveTargetsChecked cluster v).errors;
        in
        (if ch.name == null then [ "layer ${toString ch.layer}: a check has no name" ] else [ ])
        ++ (if ch.kind == null then [ "${where}: no kind" ] else [ ])
        ++ field "targets" ch.targets
        ++ field "members" ch.members;
    in
    (if lane.name == null then [ "lane ${lane.source}: no [lane] name" ] else [ ])
    ++ map (d: "duplicate layer \"${toString d}\"") (duplicates lane.layerNames)
    ++ concatMap checkErrors lane.checks;

  # The lane, or an evaluation error listing every problem.
  checkLane = cluster: lane:
    let errs = validateLane cluster lane; in
    if errs == [ ] then lane
    else throw "lane ${toString lane.name} (${lane.source}) against cluster ${toString cluster.name}: ${builtins.concatStringsSep "; " errs}";

  # The lane's checks expanded per node, as the driver names them: a check
  # whose targets select several nodes becomes <name>@<node>; a check without
  # targets (e.g. kind = "image") runs once for the cluster.
  laneChecks = cluster: lane:
    concatMap
      (ch:
        if ch.targets == null then [{ id = ch.name; inherit (ch) layer name kind; node = null; }]
        else
          let ns = resolveTargets cluster ch.targets; in
          map (n: { id = if builtins.length ns > 1 then "${ch.name}@${n}" else ch.name; inherit (ch) layer name kind; node = n; }) ns)
      (checkLane cluster lane).checks;

  # Nodes a lane touches (its targets and members), in cluster order.
  laneNodes = cluster: lane:
    let
      all = concatMap
        (ch: concatMap (v: if v == null then [ ] else resolveTargets cluster v) [ ch.targets ch.members ])
        (checkLane cluster lane).checks;
    in
    builtins.filter (n: builtins.elem n all) cluster.nodeNames;
}
