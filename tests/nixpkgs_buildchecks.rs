//! The checks nixpkgs runs on a configuration while it builds a NixOS system
//! (docs/nix.md, "Build-time checks"), run here on the files the role
//! modules hand to nixpkgs' service modules, with Debian's binaries and
//! none of the runtime files present, as in the build sandbox. The modules
//! are evaluated by the builtins-only nix-instantiate with stand-ins for
//! nixpkgs' `lib` and `pkgs`; `writeText`/`writeTextDir` write real files,
//! so a path the configuration names exists exactly when it would in the
//! build. Each check is also shown failing on a file broken on purpose.
//!
//! Needs named-checkconf, nginx, promtool, haproxy (scripts/host-deps.sh
//! --test) and nix-instantiate.

use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (run scripts/host-deps.sh --test)"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn passes(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        text(out)
    );
}

fn fails_with(what: &str, out: &Output, message: &str) {
    assert!(
        !out.status.success(),
        "{what} passed, but was broken on purpose:\n{}",
        text(out)
    );
    assert!(
        text(out).contains(message),
        "{what}: no {message:?} in:\n{}",
        text(out)
    );
}

/// What the role modules give nixpkgs' modules, for node01 (bind primary,
/// haproxy), node02 (bind secondary), node04 (nginx backend) and node06
/// (nginx gateway, prometheus). A store directory is `<dirs>/nix/store/<file>`,
/// where `/nix/store/<file>` is its content (see `materialize`).
fn evaluate(dirs: &Path) -> Value {
    let expr = r#"
      { dirs }:
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
          writeText = name: text: builtins.toFile name text;
          writeTextDir = path: text: dirs + builtins.toFile (baseNameOf path) text;
          etcd = "etcd"; redis = "redis"; qemu_kvm = "qemu"; apacheHttpd = "httpd";
          coreutils = "coreutils"; gnused = "gnused"; runtimeShell = "sh";
          ovn = "ovn"; openvswitch = "openvswitch"; haproxy = "haproxy";
        };
        module = file: node: import file { config.photon = { cluster = c; nodeName = node; }; inherit lib pkgs; };
        bind = m: { inherit (m.services.bind) extraOptions extraConfig cacheNetworks; };
        n1 = module ./nix/roles/control.nix "node01";
        n2 = module ./nix/roles/control.nix "node02";
        n4 = module ./nix/roles/worker.nix "node04";
        n6 = module ./nix/roles/gateway.nix "node06";
      in {
        primary = bind n1;
        secondary = bind n2;
        haproxy = n1.services.haproxy.config;
        backend = n4.services.nginx.appendHttpConfig;
        gateway = n6.services.nginx.appendHttpConfig;
        prometheus = n6.services.prometheus.configText;
        prometheusCheck = n6.services.prometheus.checkConfig;
      }"#;
    let dirs = dirs.to_str().unwrap();
    let out = run(
        "nix-instantiate",
        // --read-write-mode: builtins.toFile writes its file (with --eval it
        // only computes the path).
        &[
            "--eval",
            "--read-write-mode",
            "--strict",
            "--json",
            "--argstr",
            "dirs",
            dirs,
            "-E",
            expr,
        ],
    );
    passes("evaluating the role modules", &out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Makes every `<dirs>/nix/store/<file>/<name>` the configuration names: a
/// directory holding `/nix/store/<file>` as `<name>` (pkgs.writeTextDir).
fn materialize(conf: &str, dirs: &Path) {
    let prefix = format!("{}/nix/store/", dirs.display());
    for piece in conf.split('"').filter(|p| p.starts_with(&prefix)) {
        let rest = &piece[prefix.len()..];
        let (file, name) = rest.split_once('/').expect("a file in a store directory");
        let dir = dirs.join("nix/store").join(file);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(Path::new("/nix/store").join(file), dir.join(name)).unwrap();
    }
}

/// named.conf as nixpkgs' bind module writes it for its check: its rndc key
/// replaced by a test key in the store and `directory` by a fake one
/// (the shape nixpkgs issue #527921 shows from a 26.05 build: an empty
/// directory the check makes, here in the scratch directory), then the
/// role's options and statements.
fn named_conf(dir: &Path, bind: &Value) -> PathBuf {
    let rndc = dir.join("testrndc.key");
    fs::write(
        &rndc,
        "key \"rndc-key\" { algorithm hmac-sha256; secret \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"; };\n",
    )
    .unwrap();
    let fake = dir.join("test-fake-directory-for-named-checkconf");
    fs::create_dir_all(&fake).unwrap();
    let cache: Vec<String> = bind["cacheNetworks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!(" {}; ", n.as_str().unwrap()))
        .collect();
    let conf = format!(
        "include \"{}\";\ncontrols {{\n  inet 127.0.0.1 allow {{localhost;}} keys {{\"rndc-key\";}};\n}};\n\
         acl cachenetworks {{ {} }};\nacl badnetworks {{  }};\n\
         options {{\n  listen-on port 53 {{  any;  }};\n  listen-on-v6 port 53 {{  any;  }};\n\
         \x20 allow-query-cache {{ cachenetworks; }};\n  blackhole {{ badnetworks; }};\n  forward first;\n\
         \x20 forwarders {{  }};\n  directory \"{}\";\n\
         \x20 pid-file \"/run/named/named.pid\";\n  {}\n}};\n\n{}\n",
        rndc.display(),
        cache.concat(),
        fake.display(),
        bind["extraOptions"].as_str().unwrap(),
        bind["extraConfig"].as_str().unwrap(),
    );
    let file = dir.join("named.conf");
    fs::write(&file, conf).unwrap();
    file
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("nixpkgs-buildchecks-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// bind: `named-checkconf -z` loads the primary's zone and its key include;
/// both are store paths, so the check passes with nothing at run-time paths.
/// The configuration as it was before (key under /etc/bind, zone under
/// /run/named) fails exactly as nixpkgs' build did.
#[test]
fn bind_configuration_passes_named_checkconf_z_without_runtime_files() {
    for absent in ["/etc/bind/photon-update.key", "/run/named/db.photon.test"] {
        assert!(
            !Path::new(absent).exists(),
            "{absent} exists: not a build sandbox's view"
        );
    }
    let dir = scratch("bind");
    let dirs = dir.join("dirs");
    let v = evaluate(&dirs);
    for role in ["primary", "secondary"] {
        let conf_dir = dir.join(role);
        fs::create_dir_all(&conf_dir).unwrap();
        materialize(v[role]["extraConfig"].as_str().unwrap(), &dirs);
        let conf = named_conf(&conf_dir, &v[role]);
        let out = run("named-checkconf", &["-z", conf.to_str().unwrap()]);
        passes(&format!("named-checkconf -z ({role})"), &out);
        if role == "primary" {
            assert!(
                text(&out).contains("zone photon.test/IN: loaded serial 1"),
                "{}",
                text(&out)
            );
        }
    }

    // Broken on purpose: the primary's configuration before the fix.
    let old = v["primary"]["extraConfig"]
        .as_str()
        .unwrap()
        .split('"')
        .map(|p| match p {
            p if p.ends_with("/photon-update.key") => "/etc/bind/photon-update.key",
            p if p.ends_with("/db.photon.test") => "/run/named/db.photon.test",
            p => p,
        })
        .collect::<Vec<_>>()
        .join("\"");
    let mut before = v["primary"].clone();
    before["extraConfig"] = Value::String(old);
    let broken = dir.join("before");
    fs::create_dir_all(&broken).unwrap();
    let conf = named_conf(&broken, &before);
    let out = run("named-checkconf", &["-z", conf.to_str().unwrap()]);
    // The message nixpkgs issue #527921 shows for a key include outside the store.
    fails_with(
        "named-checkconf -z (runtime paths)",
        &out,
        "parsing failed: file not found",
    );

    // Broken on purpose: a zone that does not load.
    let zone = v["primary"]["extraConfig"]
        .as_str()
        .unwrap()
        .split('"')
        .find(|p| p.ends_with("/db.photon.test"))
        .unwrap()
        .to_string();
    fs::write(&zone, "$TTL 60\n@ IN SOA broken\n").unwrap();
    let conf = named_conf(&dir.join("primary"), &v["primary"]);
    let out = run("named-checkconf", &["-z", conf.to_str().unwrap()]);
    fails_with(
        "named-checkconf -z (broken zone)",
        &out,
        "photon.test/IN: loading from master file",
    );
    let _ = fs::remove_dir_all(&dir);
}

/// nginx.conf around the role's http configuration, the way nixpkgs' module
/// appends `appendHttpConfig` inside `http { }`; every path nginx opens is
/// in the scratch directory.
fn nginx_conf(dir: &Path, http: &str) -> PathBuf {
    let d = dir.display();
    let conf = format!(
        "pid {d}/nginx.pid;\nerror_log stderr;\nevents {{ }}\nhttp {{\n  access_log off;\n\
         \x20 client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         {http}\n}}\n"
    );
    let file = dir.join("nginx.conf");
    fs::write(&file, conf).unwrap();
    file
}

fn nginx_test(dir: &Path, conf: &Path) -> Output {
    run(
        "nginx",
        &[
            "-t",
            "-p",
            dir.to_str().unwrap(),
            "-e",
            "stderr",
            "-c",
            conf.to_str().unwrap(),
        ],
    )
}

#[test]
fn nginx_configurations_pass_nginx_t() {
    let dir = scratch("nginx");
    let v = evaluate(&dir.join("dirs"));
    for role in ["backend", "gateway"] {
        let conf = nginx_conf(&dir, v[role].as_str().unwrap());
        passes(&format!("nginx -t ({role})"), &nginx_test(&dir, &conf));
    }
    // Broken on purpose: an unknown directive in the gateway's server block.
    let broken = v["gateway"]
        .as_str()
        .unwrap()
        .replace("listen 80", "listen_on 80");
    let conf = nginx_conf(&dir, &broken);
    fails_with(
        "nginx -t (broken)",
        &nginx_test(&dir, &conf),
        "unknown directive \"listen_on\"",
    );
    let _ = fs::remove_dir_all(&dir);
}

/// Prometheus: the gateway sets checkConfig = "syntax-only" (its scrape
/// config names a password file that exists only at run time), so nixpkgs
/// runs `promtool check config --syntax-only`, and so does this test.
#[test]
fn prometheus_configuration_passes_promtool_syntax_only() {
    let dir = scratch("prometheus");
    let v = evaluate(&dir.join("dirs"));
    assert_eq!(v["prometheusCheck"], "syntax-only");
    let file = dir.join("prometheus.yml");
    fs::write(&file, v["prometheus"].as_str().unwrap()).unwrap();
    let f = file.to_str().unwrap();
    passes(
        "promtool check config --syntax-only",
        &run("promtool", &["check", "config", "--syntax-only", f]),
    );
    // Broken on purpose: a field Prometheus does not know.
    let broken = v["prometheus"]
        .as_str()
        .unwrap()
        .replace("scrape_interval", "scrape_intervall");
    fs::write(&file, broken).unwrap();
    fails_with(
        "promtool check config --syntax-only (broken)",
        &run("promtool", &["check", "config", "--syntax-only", f]),
        "field scrape_intervall not found",
    );
    let _ = fs::remove_dir_all(&dir);
}

/// HAProxy: `haproxy -c -f` on the file nixpkgs' module writes (its own
/// `global` stats socket, then the role's configuration).
#[test]
fn haproxy_configuration_passes_haproxy_c() {
    let dir = scratch("haproxy");
    let v = evaluate(&dir.join("dirs"));
    let file = dir.join("haproxy.conf");
    let write = |cfg: &str| {
        let module = "global\n  # needed for hot-reload to work without dropping packets in multi-worker mode\n  \
                      stats socket /run/haproxy/haproxy.sock mode 600 expose-fd listeners level user\n\n";
        fs::write(&file, format!("{module}{cfg}")).unwrap();
    };
    write(v["haproxy"].as_str().unwrap());
    let f = file.to_str().unwrap();
    passes("haproxy -c", &run("haproxy", &["-c", "-f", f]));
    // Broken on purpose: a balance algorithm HAProxy does not have.
    write(
        &v["haproxy"]
            .as_str()
            .unwrap()
            .replace("balance roundrobin", "balance nonsense"),
    );
    fails_with(
        "haproxy -c (broken)",
        &run("haproxy", &["-c", "-f", f]),
        "ALERT",
    );
    let _ = fs::remove_dir_all(&dir);
}

/// The unit-level fixes of issue 28, read from the modules (stand-ins as
/// above): the store's 9p mount waits for its transport module as nixpkgs'
/// qemu-vm.nix has it, ovn-controller has its /run/ovn, and on the primary
/// named writes only where its unit may, after the config disk is mounted.
#[test]
fn nixos_units_have_the_ordering_and_directories_nixpkgs_expects() {
    let expr = r#"
      let
        c = (import ./nix/lib { }).profiles.reference;
        lib = {
          optionalString = b: s: if b then s else "";
          mkIf = b: v: if b then v else { };
          mkBefore = v: v;
          mkForce = v: v;
          escapeShellArg = s: "'${s}'";
          toInt = builtins.fromJSON;
          last = l: builtins.elemAt l (builtins.length l - 1);
          splitString = sep: s: builtins.filter builtins.isString (builtins.split sep s);
          inherit (builtins) listToAttrs;
        };
        pkgs = {
          writeText = n: t: "<${n}>"; writeTextDir = n: t: "/nix/store/x-${n}";
          etcd = "etcd"; redis = "redis"; coreutils = "cu"; gnused = "sed";
          ovn = "ovn"; openvswitch = "ovs"; haproxy = "haproxy";
          curl = "curl"; socat = "socat"; jq = "jq";
        };
        args = node: { config.photon = { cluster = c; nodeName = node; }; inherit lib pkgs; modulesPath = "/m"; };
        n1 = import ./nix/roles/control.nix (args "node01");
        common = import ./nix/roles/common.nix (args "node01");
        n2 = import ./nix/roles/control.nix (args "node02");
        n4 = import ./nix/roles/worker.nix (args "node04");
      in {
        store = common.fileSystems."/nix/store".options;
        ovn = n4.systemd.services.ovn-controller.serviceConfig.RuntimeDirectory;
        bind = { inherit (n1.systemd.services.bind) after requires serviceConfig; noPreStart = !(n1.systemd.services.bind ? preStart); };
        files = { inherit (n1.systemd.services.photon-named-files) unitConfig after before script; };
        secondary = { inherit (n2.systemd.services.bind) requires; inherit (n2.systemd.services.photon-named-files) script; };
      }"#;
    let out = run(
        "nix-instantiate",
        &["--eval", "--strict", "--json", "-E", expr],
    );
    passes("evaluating the units", &out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let store: Vec<&str> = v["store"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert!(
        store.contains(&"x-systemd.requires=modprobe@9pnet_virtio.service"),
        "{store:?}"
    );
    assert_eq!(v["ovn"], "ovn");
    assert_eq!(
        v["bind"]["noPreStart"], true,
        "bind's unit writes nothing: {v}"
    );
    assert_eq!(v["bind"]["requires"][0], "photon-named-files.service");
    assert_eq!(v["files"]["unitConfig"]["RequiresMountsFor"], "/photon");
    assert_eq!(v["files"]["before"][0], "bind.service");
    let binds = v["bind"]["serviceConfig"]["BindPaths"][0].as_str().unwrap();
    assert_eq!(binds, "/run/photon-named/zone:/nix/store/x-db.photon.test");
    let script = v["files"]["script"].as_str().unwrap();
    assert!(
        script.contains(". /photon/node.env")
            && script.contains("/run/photon-named/key/photon-update.key"),
        "{script}"
    );
    // Every control node: the rndc key named's own preStart would write as
    // `named` into root's /etc/bind; on secondaries nothing from /photon.
    assert!(
        script.contains("rndc-confgen -c /etc/bind/rndc.key"),
        "{script}"
    );
    let secondary = v["secondary"]["script"].as_str().unwrap();
    assert!(
        secondary.contains("rndc-confgen") && !secondary.contains("/photon"),
        "{secondary}"
    );
    assert_eq!(v["secondary"]["requires"][0], "photon-named-files.service");
}
