# Small helpers over builtins, so nothing in nix/lib needs nixpkgs.
rec {
  hasPrefix = prefix: s:
    builtins.substring 0 (builtins.stringLength prefix) s == prefix;

  hasSuffix = suffix: s:
    let
      ls = builtins.stringLength s;
      lx = builtins.stringLength suffix;
    in
    ls >= lx && builtins.substring (ls - lx) lx s == suffix;

  concatMap = f: xs: builtins.concatLists (map f xs);

  unique = xs: builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ] xs;

  # Elements that occur more than once, each reported once.
  duplicates = xs:
    unique (builtins.filter (x: builtins.length (builtins.filter (y: y == x) xs) > 1) xs);

  toList = x: if builtins.isList x then x else [ x ];

  # Single-quote a string for /bin/sh.
  shellQuote = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";

  shellWords = xs: builtins.concatStringsSep " " (map shellQuote xs);

  # A path (./images) or a string ("/nix/store/...-images", "/srv/images").
  # Paths are copied into the store when interpolated; strings stay as given.
  pathString = p: if builtins.isPath p then "${p}" else toString p;

  # Is a string (after interpolation) inside the Nix store?
  inStore = s: hasPrefix (builtins.storeDir + "/") s;

  # Is s equal to, or under, one of the prefixes (the driver's --allow-impure rule)?
  underAny = prefixes: s:
    builtins.any (p: s == p || hasPrefix (p + "/") s || (hasSuffix "/" p && hasPrefix p s)) prefixes;
}
