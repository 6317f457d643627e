# mkLayeredCheck: a lane as a graph of derivations instead of one.
#
#   images, driver, cluster
#        -> <cluster>-ready            boots once, saves the ready cluster ($out)
#        -> <lane>-layer-<layer>       one per layer: restores the ready output,
#                                      runs that layer only (its own lane file)
#        -> <lane>                     assembles result.json, junit.xml, report.html
#
# Each layer derivation gets a lane file of its layer alone, written at eval
# time, so changing a check of one layer rebuilds that layer and the
# assembly only; the ready cluster and the other layers come from the store.
# Layers keep their output when they fail (keepFailed), so the lane always
# assembles every layer; the lane itself fails unless keepFailed is set.
# Takes mkClusterCheck's arguments (nix/lib/check.nix), with the lane given
# as a `laneFile` path (read at eval time).
{ util, defs, check }:
let
  inherit (util) concatMap;

  # TOML for what fromTOML gave: scalars, lists of scalars, tables of
  # scalars (inline). Enough for lane files (docs/adding-a-check.md).
  value = v:
    if builtins.isAttrs v then
      "{ " + builtins.concatStringsSep ", " (map (k: "${k} = ${value v.${k}}") (builtins.attrNames v)) + " }"
    else if builtins.isList v then "[ " + builtins.concatStringsSep ", " (map value v) + " ]"
    else builtins.toJSON v;
  table = header: attrs:
    builtins.concatStringsSep "\n" ([ header ]
      ++ map (k: "${k} = ${value attrs.${k}}") (builtins.attrNames attrs)) + "\n";

  # The lane file of one layer: the [lane] table and that layer alone.
  layerToml = raw: layer:
    table "[lane]" raw.lane
    + table "\n[[layer]]" (removeAttrs layer [ "check" "after" ])
    + builtins.concatStringsSep "" (map (c: table "\n[[layer.check]]" c) (layer.check or [ ]));
in
{
  # The lane file text of one layer (an element of fromTOML's `layer` list).
  layerLaneToml = layerToml;

  # The layer names of a lane file, in order, without building anything.
  laneLayerNames = laneFile: map (l: l.name) ((builtins.fromTOML (builtins.readFile laneFile)).layer or [ ]);

  mkLayeredCheck =
    { name, laneFile, cluster ? null, profile ? "reference", keepFailed ? false, extraArgs ? [ ], ... }@args:
    let
      raw = builtins.fromTOML (builtins.readFile laneFile);
      layerNames = map (l: l.name) (raw.layer or [ ]);
      clusterDef = if cluster != null && builtins.isPath cluster then defs.clusterFromToml cluster else null;
      clusterName = if clusterDef != null && clusterDef.name != null then clusterDef.name else profile;
      base = removeAttrs args [ "laneFile" "readyName" ];

      # Boots and saves; no lane runs, so it depends on no lane file.
      ready = check.mkClusterCheck (base // {
        name = args.readyName or "${clusterName}-ready";
        lane = "smoke";
        laneFile = null;
        validate = false;
        # With keepFailed a boot that fails is an output too (its consoles,
        # boot.json says why), and every layer reports itself skipped
        # because the ready cluster is missing, instead of a bare
        # dependency failure.
        inherit keepFailed;
        extraArgs = extraArgs ++ [ "--ready" ];
      });

      # A layer with `after = "<earlier>"` starts from that layer's end
      # state, which the earlier layer then saves (--save-end, in $out/end).
      # The driver refused an `after` that names no earlier layer.
      continued = map (l: l.after) (builtins.filter (l: l ? after) (raw.layer or [ ]));
      from = l: if l ? after then "${layers.${l.after}}/end" else "${ready}";
      layer = l: check.mkClusterCheck (base // {
        name = "${name}-layer-${l.name}";
        laneFile = builtins.toFile "${raw.lane.name or name}-${l.name}.toml" (layerToml raw l);
        validate = false;
        keepFailed = true;
        extraArgs = extraArgs ++ [ "--from-ready" (from l) "--layer" l.name ]
          ++ (if builtins.elem l.name continued then [ "--save-end" ] else [ ]);
      });
      layers = builtins.listToAttrs (map (l: { name = l.name; value = layer l; }) (raw.layer or [ ]));

      lane = check.mkClusterCheck (base // {
        inherit name keepFailed laneFile;
        extraArgs = extraArgs ++ concatMap (l: [ "--assemble" "${layers.${l}}" ]) layerNames;
      });
    in
    lane // {
      inherit ready layers layerNames;
      passthru = lane.passthru // { inherit ready layers; };
    };
}
