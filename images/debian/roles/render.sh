# The Debian side of services/: the repository's one copy of every server's
# configuration, shipped on the config disk under /photon/services.
# `render FILE` prints services/FILE with its tokens filled in for this node
# (the syntax is in services/README.md). nix/roles/services.nix renders the
# same files for the NixOS images; tests/services.rs proves both agree.
# Sourced with node.env loaded. Values: node.env, the addresses in /etc/hosts
# (as written from the config disk), and those a role script sets before it
# renders (ZONE_FILE, KEY_FILE, IAM_SECRET_FILE, IAM_WEB_CONFIG, IAM_HASH).
SERVICES=${PHOTON_SERVICES:-/photon/services}
HOSTS=${PHOTON_HOSTS:-/etc/hosts}
addr() { awk -v n="$1" '{ for (i = 2; i <= NF; i++) if ($i == n) { print $1; exit } }' "$HOSTS"; }
PRIMARY=${CONTROL_NODES%% *}
PRIMARY_ADDR=$(addr "$PRIMARY")
OTHER_NODES=""
for n in $ALL_NODES; do [ "$n" = "$NODE_NAME" ] || OTHER_NODES="$OTHER_NODES${OTHER_NODES:+ }$n"; done
SECONDARY_NODES=""
for n in $CONTROL_NODES; do [ "$n" = "$PRIMARY" ] || SECONDARY_NODES="$SECONDARY_NODES${SECONDARY_NODES:+ }$n"; done

RENDER_SCALARS="CLUSTER_NAME DOMAIN NODE_NAME NODE_ADDR PRIMARY PRIMARY_ADDR ZONE_FILE KEY_FILE IAM_SECRET_FILE IAM_WEB_CONFIG IAM_HASH"
RENDER_LISTS="ALL_NODES CONTROL_NODES WORKER_NODES OTHER_NODES SECONDARY_NODES"
# Values are read from the environment (awk -v would unescape backslashes).
RENDER_AWK='
function die(msg) { printf "render: %s:%d: %s\n", FILENAME, FNR, msg > "/dev/stderr"; exit 1 }
function subst(s, from, to,   out, i) {
    out = ""
    while ((i = index(s, from)) > 0) { out = out substr(s, 1, i - 1) to; s = substr(s, i + length(from)) }
    return out s
}
function members(name, out) {
    if (!(name in islist) || !(name in ENVIRON)) die("unknown list " name)
    return split(ENVIRON[name], out, " ")
}
function item(s, n) {
    if (!(n in addr)) die("no address for " n " in " hosts)
    return subst(subst(s, "%N_ADDR%", addr[n]), "%N%", n)
}
function joins(s,   out, i, rest, j, k, m, list, sep, it, names, c, x) {
    out = ""
    while ((i = index(s, "@JOIN:")) > 0) {
        out = out substr(s, 1, i - 1); rest = substr(s, i + 6)
        j = index(rest, ":"); list = substr(rest, 1, j - 1); rest = substr(rest, j + 1)
        k = index(rest, ":"); sep = substr(rest, 1, k - 1); rest = substr(rest, k + 1)
        m = index(rest, "@"); it = substr(rest, 1, m - 1); s = substr(rest, m + 1)
        if (j == 0 || k == 0 || m == 0 || list !~ /^[A-Z_]+$/ || sep ~ /@/) die("malformed @JOIN")
        c = members(list, names)
        for (x = 1; x <= c; x++) out = out (x > 1 ? sep : "") item(it, names[x])
    }
    return out s
}
function scalars(s,   out, i, rest, j, name) {
    out = ""
    while ((i = index(s, "@")) > 0) {
        rest = substr(s, i + 1); j = index(rest, "@")
        if (j == 0) break
        name = substr(rest, 1, j - 1)
        if (name ~ /^[A-Z][A-Z0-9_]*$/) {
            if (!(name in scalar) || !(name in ENVIRON)) die("unknown token @" name "@")
            out = out substr(s, 1, i - 1) ENVIRON[name]; s = substr(rest, j + 1)
        } else {
            out = out substr(s, 1, i); s = rest
        }
    }
    return out s
}
BEGIN {
    n = split(ENVIRON["RENDER_SCALARS"], t, " "); for (i = 1; i <= n; i++) scalar[t[i]] = 1
    n = split(ENVIRON["RENDER_LISTS"], t, " "); for (i = 1; i <= n; i++) islist[t[i]] = 1
    hosts = ARGV[1]
}
FILENAME == hosts { for (i = 2; i <= NF; i++) if (!($i in addr)) addr[$i] = $1; next }
substr($0, 1, 6) == "@EACH:" {
    rest = substr($0, 7); j = index(rest, "@"); list = substr(rest, 1, j - 1)
    if (j == 0 || list !~ /^[A-Z_]+$/) die("malformed @EACH")
    c = members(list, names)
    for (x = 1; x <= c; x++) print scalars(joins(item(substr(rest, j + 1), names[x])))
    next
}
{ print scalars(joins($0)) }
'
render() {
    (
        export RENDER_SCALARS RENDER_LISTS $RENDER_SCALARS $RENDER_LISTS
        awk "$RENDER_AWK" "$HOSTS" "$SERVICES/$1"
    )
}
