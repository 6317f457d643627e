//! Service configuration lives once, in `services/`, and both image
//! providers render those files: the Debian guests with
//! `images/debian/roles/render.sh` (awk, at first boot, from the config
//! disk), the NixOS images with `nix/roles/services.nix` (builtins, at
//! evaluation). These tests render every file for every node of the
//! reference cluster both ways and compare the text, evaluate the NixOS role
//! modules (with stand-ins for nixpkgs) to see that they hand the rendered
//! files to their services, and check that no role script or module restates
//! the configuration. Needs `sh`, `awk` and Debian's nix-bin
//! (scripts/host-deps.sh); fails, never skips, without them.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (run scripts/host-deps.sh)"))
}

fn ok(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The templates, as paths relative to services/ (README.md is not one).
fn templates() -> Vec<String> {
    let dir = repo().join("services");
    let mut found = Vec::new();
    for sub in std::fs::read_dir(&dir).unwrap() {
        let sub = sub.unwrap().path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).unwrap() {
                let f = f.unwrap().path();
                found.push(f.strip_prefix(&dir).unwrap().to_str().unwrap().to_string());
            }
        }
    }
    found.sort();
    assert!(found.len() >= 10, "{found:?}");
    found
}

struct Node {
    name: String,
    role: String,
    address: String,
}

struct Reference {
    name: String,
    domain: String,
    nodes: Vec<Node>,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(repo().join("profiles/reference.toml")).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let s = |v: &toml::Value| v.as_str().unwrap().to_string();
    Reference {
        name: s(&doc["cluster"]["name"]),
        domain: s(&doc["network"]["domain"]),
        nodes: doc["node"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| Node {
                name: s(&n["name"]),
                role: s(&n["role"]),
                address: s(&n["address"]),
            })
            .collect(),
    }
}

/// The provider's own values, the same on both sides so the comparison is
/// about the templates and the renderers. The hash has the characters sed
/// and awk -v would mangle.
const VALUES: &[(&str, &str)] = &[
    ("ZONE_FILE", "/var/lib/bind/db.photon.test"),
    ("KEY_FILE", "/etc/bind/photon-update.key"),
    ("IAM_SECRET_FILE", "/etc/prometheus/iam-secret"),
    ("IAM_WEB_CONFIG", "/etc/prometheus/iam-web.yml"),
    ("IAM_HASH", "$2y$05$ab/cd.ef&g\\h|i"),
];

/// Every template rendered for one node the way a Debian guest does: its
/// node.env and /etc/hosts as the driver writes them on the config disk
/// (src/provision.rs, src/fabric.rs), then render.sh.
fn debian_render(c: &Reference, node: &Node, dir: &Path) -> BTreeMap<String, String> {
    let names = |role: Option<&str>| {
        c.nodes
            .iter()
            .filter(|n| role.is_none_or(|r| n.role == r))
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let env = [
        ("CLUSTER_NAME", c.name.clone()),
        ("NODE_NAME", node.name.clone()),
        ("NODE_ROLE", node.role.clone()),
        ("NODE_ADDR", node.address.clone()),
        ("DOMAIN", c.domain.clone()),
        ("ALL_NODES", names(None)),
        ("CONTROL_NODES", names(Some("control"))),
        ("WORKER_NODES", names(Some("worker"))),
        ("GATEWAY_NODES", names(Some("gateway"))),
        ("STORAGE_NODES", names(Some("storage"))),
        ("IAM_SECRET", "s3cret".into()),
    ];
    let node_env: String = env.iter().map(|(k, v)| format!("{k}='{v}'\n")).collect();
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for n in &c.nodes {
        hosts.push_str(&format!(
            "{} {}.{} {}\n",
            n.address, n.name, c.domain, n.name
        ));
    }
    std::fs::write(dir.join("node.env"), node_env).unwrap();
    std::fs::write(dir.join("hosts"), hosts).unwrap();
    let files = templates();
    let script = format!(
        ". {}/node.env\n. images/debian/roles/render.sh\n\
         for f in \"$@\"; do render \"$f\"; printf '\\036'; done",
        dir.display()
    );
    let mut args = vec!["-euc", script.as_str(), "sh"];
    args.extend(files.iter().map(String::as_str));
    let hosts = dir.join("hosts");
    let mut env: Vec<(&str, &str)> = VALUES.to_vec();
    env.push(("PHOTON_SERVICES", "services"));
    env.push(("PHOTON_HOSTS", hosts.to_str().unwrap()));
    let out = ok(
        &format!("render.sh for {}", node.name),
        &run("sh", &args, &env),
    );
    let parts: Vec<&str> = out.split('\u{1e}').collect();
    assert_eq!(parts.len(), files.len() + 1, "{out}");
    files
        .into_iter()
        .zip(parts)
        .map(|(f, t)| (f, t.to_string()))
        .collect()
}

fn nix_values() -> String {
    VALUES
        .iter()
        .map(|(k, v)| format!("{k} = {};", serde_json::to_string(v).unwrap()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every template rendered for every node by nix/roles/services.nix.
fn nixos_render() -> BTreeMap<String, BTreeMap<String, String>> {
    let files = serde_json::to_string(&templates()).unwrap();
    let expr = format!(
        "let c = (import ./nix/lib {{ }}).profiles.reference; files = builtins.fromJSON ''{files}''; \
         in builtins.listToAttrs (map (n: {{ name = n; value = \
           let s = import ./nix/roles/services.nix {{ cluster = c; nodeName = n; values = {{ {} }}; }}; \
           in builtins.listToAttrs (map (f: {{ name = f; value = s.render f; }}) files); }}) c.nodeNames)",
        nix_values()
    );
    let out = run(
        "nix-instantiate",
        &["--eval", "--strict", "--json", "-E", &expr],
        &[],
    );
    serde_json::from_str(&ok("nix/roles/services.nix", &out)).unwrap()
}

#[test]
fn debian_and_nixos_render_every_service_file_alike() {
    let c = reference();
    let nixos = nixos_render();
    let dir = std::env::temp_dir().join(format!("pc-services-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for node in &c.nodes {
        let debian = debian_render(&c, node, &dir);
        let theirs = &nixos[&node.name];
        for (file, text) in &debian {
            assert_eq!(
                Some(text),
                theirs.get(file),
                "services/{file} for {}: Debian (left) and NixOS (right) differ",
                node.name
            );
            for leftover in ["@EACH:", "@JOIN:", "%N%", "%N_ADDR%"] {
                assert!(
                    !text.contains(leftover),
                    "services/{file}: {leftover} left in\n{text}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    // What the reference cluster's lanes rely on, spot-checked.
    let n1 = &nixos["node01"];
    let n2 = &nixos["node02"];
    let n6 = &nixos["node06"];
    assert!(n1["etcd/etcd.env"].contains(
        "ETCD_INITIAL_CLUSTER=node01=http://10.77.0.11:2380,node02=http://10.77.0.12:2380,\
         node03=http://10.77.0.13:2380\n"
    ));
    assert!(n2["etcd/etcd.env"].contains("ETCD_LISTEN_PEER_URLS=http://10.77.0.12:2380\n"));
    assert!(n1["haproxy/haproxy.cfg"].contains(
        "    server node04 10.77.0.14:8080 check inter 2s\n    server node05 10.77.0.15:8080 check inter 2s\nlisten stats\n"
    ));
    assert!(n1["bind/db.zone"].contains("node06 IN A 10.77.0.16\napi IN A 10.77.0.11\n"));
    assert!(n1["bind/primary.conf"].contains("also-notify { 10.77.0.12; 10.77.0.13; }"));
    assert!(n2["bind/secondary.conf"].contains("primaries { 10.77.0.11; }"));
    assert_eq!(n2["redis/replica.conf"], "replicaof 10.77.0.11 6379\n");
    assert!(n6["prometheus/prometheus.yml"].contains(
        "- targets: ['node01:9100', 'node02:9100', 'node03:9100', 'node04:9100', 'node05:9100']\n"
    ));
    assert!(n6["prometheus/prometheus.yml"].contains("- targets: ['node06:9100']\n"));
    assert_eq!(
        n6["prometheus/iam-web.yml"],
        "basic_auth_users:\n  creditservice: '$2y$05$ab/cd.ef&g\\h|i'\n"
    );
    assert!(nixos["node04"]["nginx/backend.conf"].contains("photon web backend node04\\n"));
}

#[test]
fn both_renderers_refuse_unknown_tokens_and_lists() {
    let dir = std::env::temp_dir().join(format!("pc-services-bad-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("t")).unwrap();
    std::fs::write(dir.join("hosts"), "10.77.0.11 node01.photon.test node01\n").unwrap();
    let env = "NODE_NAME=node01 NODE_ADDR=10.77.0.11 CLUSTER_NAME=x DOMAIN=photon.test \
               ALL_NODES=node01 CONTROL_NODES=node01 WORKER_NODES=";
    for (bad, text) in [
        ("token", "a @NOPE@ b\n"),
        ("unset", "zone @ZONE_FILE@\n"),
        ("list", "@EACH:NOPE@%N%\n"),
        ("join", "x @JOIN:NOPE:,:%N%@\n"),
    ] {
        std::fs::write(dir.join("t").join(bad), text).unwrap();
        let script = format!("{env}; . images/debian/roles/render.sh; render t/{bad} >/dev/null");
        let hosts = dir.join("hosts");
        let out = run(
            "sh",
            &["-euc", &script],
            &[
                ("PHOTON_SERVICES", dir.to_str().unwrap()),
                ("PHOTON_HOSTS", hosts.to_str().unwrap()),
            ],
        );
        assert!(!out.status.success(), "render.sh accepted {text:?}");
        // services.nix reads services/ only; copy its renderer next to the bad file.
        let nix_dir = dir.join("nix").join("roles");
        std::fs::create_dir_all(&nix_dir).unwrap();
        std::fs::copy(
            repo().join("nix/roles/services.nix"),
            nix_dir.join("services.nix"),
        )
        .unwrap();
        let services = dir.join("services").join("t");
        std::fs::create_dir_all(&services).unwrap();
        std::fs::write(services.join(bad), text).unwrap();
        let expr = format!(
            "(import {}/nix/roles/services.nix {{ cluster = (import ./nix/lib {{ }}).profiles.reference; \
             nodeName = \"node01\"; }}).render \"t/{bad}\"",
            dir.display()
        );
        let out = run("nix-instantiate", &["--eval", "--strict", "-E", &expr], &[]);
        assert!(!out.status.success(), "services.nix accepted {text:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("render: services/t/"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The role modules evaluated with stand-ins for nixpkgs' lib and pkgs: each
/// hands its services the rendered files, not text of its own.
#[test]
fn nixos_role_modules_hand_the_rendered_files_to_their_services() {
    let expr = r#"
      let
        c = (import ./nix/lib { }).profiles.reference;
        lib = {
          optionalString = b: s: if b then s else "";
          mkIf = b: v: if b then v else { };
          mkBefore = v: v;
          mkForce = v: v;
          escapeShellArg = s: "'${s}'";
        };
        pkgs = {
          # A stand-in that keeps the name and the text, with no store.
          writeText = name: text: "<${name}>${text}</${name}>";
          writeTextDir = name: text: "<dir ${name}>";
          etcd = "etcd"; redis = "redis"; qemu_kvm = "qemu"; apacheHttpd = "httpd";
          coreutils = "coreutils"; gnused = "gnused";
          ovn = "ovn"; openvswitch = "openvswitch"; haproxy = "haproxy";
        };
        module = file: node: import file { config.photon = { cluster = c; nodeName = node; }; inherit lib pkgs; };
        svc = node: values: import ./nix/roles/services.nix { cluster = c; nodeName = node; inherit values; };
        n1 = module ./nix/roles/control.nix "node01";
        n2 = module ./nix/roles/control.nix "node02";
        n4 = module ./nix/roles/worker.nix "node04";
        n6 = module ./nix/roles/gateway.nix "node06";
        gw = svc "node06" { IAM_SECRET_FILE = "/run/photon/iam-secret"; IAM_WEB_CONFIG = "/run/photon/iam-web.yml"; IAM_HASH = "@IAM_HASH@"; };
      in {
        haproxy = n1.services.haproxy.config == (svc "node01" { }).render "haproxy/haproxy.cfg";
        etcdEnv = n2.systemd.services.etcd.serviceConfig.EnvironmentFile == pkgs.writeText "etcd.env" ((svc "node02" { }).render "etcd/etcd.env");
        etcdDataDir = n2.services.etcd.dataDir;
        redisPrimary = n1.services.redis.servers."".settings;
        redisReplica = n2.services.redis.servers."".settings;
        zonePrimary = n1.services.bind.extraConfig == (svc "node01" {
          ZONE_FILE = "<dir db.photon.test>/db.photon.test";
          KEY_FILE = "<dir photon-update.key>/photon-update.key";
        }).render "bind/primary.conf";
        zoneSecondary = n2.services.bind.extraConfig == (svc "node02" {
          ZONE_FILE = "/run/named/db.photon.test";
        }).render "bind/secondary.conf";
        bindOptions = n1.services.bind.extraOptions == (svc "node01" { }).render "bind/options.conf";
        backend = n4.services.nginx.appendHttpConfig == (svc "node04" { }).render "nginx/backend.conf";
        gateway = n6.services.nginx.appendHttpConfig == (svc "node06" { }).render "nginx/gateway.conf";
        prometheus = n6.services.prometheus.configText == gw.render "prometheus/prometheus.yml";
        prometheusFlags = n6.services.prometheus.extraFlags;
        exporterFlags = n6.services.prometheus.exporters.node.extraFlags;
        iamWeb = n6.systemd.services.photon-iam-web.script;
        primaryKey = n1.systemd.services.photon-named-files.script;
        northd = n1.systemd.services.ovn-northd.serviceConfig.ExecStart;
        noNorthdOnSecondaries = n2.systemd.services.ovn-northd == { };
        chassis = n4.systemd.services.ovn-controller.preStart;
        iamWebTemplate = pkgs.writeText "iam-web.yml" (gw.render "prometheus/iam-web.yml");
      }"#;
    let out = run(
        "nix-instantiate",
        &["--eval", "--strict", "--json", "-E", expr],
        &[],
    );
    let v: Value = serde_json::from_str(&ok("role modules", &out)).unwrap();
    for same in [
        "haproxy",
        "etcdEnv",
        "zonePrimary",
        "zoneSecondary",
        "bindOptions",
        "backend",
        "gateway",
        "prometheus",
    ] {
        assert_eq!(
            v[same], true,
            "{same}: the module does not use the rendered file: {v}"
        );
    }
    assert_eq!(v["noNorthdOnSecondaries"], true);
    assert!(
        v["primaryKey"].as_str().unwrap().contains("photon-update"),
        "{v}"
    );
    assert!(
        v["northd"]
            .as_str()
            .unwrap()
            .contains("--db-sb-create-insecure-remote=yes")
    );
    let chassis = v["chassis"].as_str().unwrap();
    assert!(
        chassis.contains("ovn-remote=tcp:10.77.0.11:6642"),
        "{chassis}"
    );
    assert!(chassis.contains("ovn-encap-ip=10.77.0.14"), "{chassis}");
    assert_eq!(v["etcdDataDir"], "/var/lib/etcd/photon");
    assert_eq!(
        v["redisPrimary"],
        serde_json::json!({ "bind": "0.0.0.0", "protected-mode": "no" })
    );
    assert_eq!(v["redisReplica"]["replicaof"], "10.77.0.11 6379");
    assert_eq!(
        v["prometheusFlags"],
        serde_json::json!([
            "--web.enable-remote-write-receiver",
            "--storage.tsdb.retention.time=1d"
        ])
    );
    assert_eq!(
        v["exporterFlags"],
        serde_json::json!(["--web.config.file=/run/photon/iam-web.yml"])
    );
    let script = v["iamWeb"].as_str().unwrap();
    let template = v["iamWebTemplate"].as_str().unwrap();
    assert!(
        template.contains("creditservice: '@IAM_HASH@'"),
        "{template}"
    );
    assert!(
        script.contains(&format!(
            "sed \"s|@IAM_HASH@|$hash|\" {template} > /run/photon/iam-web.yml"
        )),
        "{script}"
    );
}

/// No role script or NixOS module says again what a template says: every
/// literal run of at least 10 characters in a template (between tokens) is
/// absent from them.
#[test]
fn no_role_script_or_module_restates_service_configuration() {
    let mut sources = Vec::new();
    for dir in ["images/debian/roles", "nix/roles"] {
        for f in std::fs::read_dir(repo().join(dir)).unwrap() {
            let f = f.unwrap().path();
            sources.push((f.clone(), std::fs::read_to_string(&f).unwrap()));
        }
    }
    sources.push((
        repo().join("images/debian/customize.sh"),
        std::fs::read_to_string(repo().join("images/debian/customize.sh")).unwrap(),
    ));
    let mut checked = 0;
    for t in templates() {
        let text = std::fs::read_to_string(repo().join("services").join(&t)).unwrap();
        for line in text.lines() {
            for fragment in literal_runs(line) {
                let fragment = fragment.trim();
                if fragment.len() < 10 {
                    continue;
                }
                checked += 1;
                for (path, source) in &sources {
                    assert!(
                        !source.contains(fragment),
                        "{} restates services/{t}: {fragment:?}",
                        path.display()
                    );
                }
            }
        }
    }
    assert!(checked > 30, "only {checked} fragments checked");
}

/// A template line's literal runs: the text between `@TOKEN@`, `@EACH:...@`,
/// `@JOIN:...@` and `%N%`/`%N_ADDR%`. A lone `@` (the zone's origin,
/// haproxy's `ipv4@`) is literal text.
fn literal_runs(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut rest = line;
    loop {
        let next = ["@", "%N%", "%N_ADDR%"]
            .iter()
            .filter_map(|m| rest.find(m).map(|i| (i, *m)))
            .min();
        let Some((i, m)) = next else {
            out.last_mut().unwrap().push_str(rest);
            return out;
        };
        out.last_mut().unwrap().push_str(&rest[..i]);
        let after = &rest[i + m.len()..];
        let end = if m != "@" {
            Some(0)
        } else if let Some(join) = after.strip_prefix("JOIN:") {
            // LIST:SEP:ITEM@ -- the item is split again for its own runs.
            let list_end = join.find(':').unwrap() + 1;
            let sep_end = list_end + join[list_end..].find(':').unwrap() + 1;
            let item_end = sep_end + join[sep_end..].find('@').unwrap();
            out.extend(literal_runs(&join[sep_end..item_end]));
            Some(5 + item_end + 1)
        } else {
            after
                .find('@')
                .filter(|&j| j > 0 && !after[..j].contains(' '))
                .map(|j| j + 1)
        };
        match end {
            Some(n) => {
                out.push(String::new());
                rest = &after[n..];
            }
            None => {
                out.last_mut().unwrap().push('@');
                rest = after;
            }
        }
    }
}
