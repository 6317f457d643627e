//! Command-line definitions, and the mapping from each command to the
//! functions that do the work.

use crate::cluster::{self, StartOptions};
use crate::error::bad_input;
use crate::lane::Lane;
use crate::machine::{self, accel::AccelRequest};
use crate::smoke::{self, LaneOptions};
use crate::spec::Cluster;
use crate::state::{self, RunningCluster, StateDir};
use crate::{image, status};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Boot clusters of QEMU virtual machines from prebuilt images, validate them
/// layer by layer, and keep the evidence.
///
/// The default cluster is the embedded `reference` profile: six Debian guests
/// (node01-03 control plane, node04-05 workers, node06 gateway).
///
/// One command for a verdict with evidence:
///   photon-cluster fresh-smoke      # clean, build, start, every layer, stop
///
/// Typical session:
///   photon-cluster validate         # preflight: host, definitions, images
///   photon-cluster build            # build the images (cached by recipe)
///   photon-cluster start            # boot every node, wait until ready
///   photon-cluster smoke            # run the smoke lane against it
///   photon-cluster matrix           # composed scenarios (also bench-storage,
///                                   # provider-vm-reality-proof)
///   photon-cluster status           # state, accel, ports, units per node
///   photon-cluster ssh node04       # a shell on node04
///   photon-cluster stop             # power down, kill after a deadline
///
/// Lane runs leave ./work/<lane>/<timestamp>/ (and ./work/<lane>/latest):
/// result.json, junit.xml, report.md, nodes/<node>/vm.log and journals.
///
/// Exit codes: 0 passed (degraded checks included); 1 a check failed; 2 bad
/// input (refused before anything started); 3 infrastructure failure
/// (build, QEMU, boot); 124 the global --timeout expired; 130 interrupted.
/// Errors are printed as `error[KIND]: ...`; the stable kinds are listed in
/// docs/troubleshooting.md and kept in result.json's `error_kind`.
#[derive(Parser, Debug)]
#[command(name = "photon-cluster", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(flatten)]
    pub target: Target,
    /// The driver's log on stderr: `human` lines, or `json` lines for log
    /// shippers (with time, level, command, node, layer and check).
    /// `RUST_LOG` filters it (default `info`; `RUST_LOG=debug` for more).
    #[arg(long, global = true, value_enum, default_value = "human")]
    pub log_format: crate::log::LogFormat,
    /// Give up on the whole command after SECS seconds: the lane stops as
    /// after Ctrl-C, its evidence is collected, the artifacts are written
    /// with status `timeout`, whatever this command booted is stopped, and
    /// it exits 124. (A lane on an already running cluster leaves it running.)
    #[arg(long, global = true, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// Only warnings and errors on stderr, and no live progress display.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More on stderr: -v debug, -vv trace (unless `RUST_LOG` is set).
    /// Every lane run keeps its full debug log in driver.log either way.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// An embedded profile: `reference` (six nodes) or `reference-storage` (five).
    #[arg(
        long,
        global = true,
        default_value = "reference",
        conflicts_with = "cluster"
    )]
    pub profile: String,
    /// A cluster definition file (TOML) instead of an embedded profile.
    #[arg(long, global = true, value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// Base state directory [default: $PHOTON_VM_DIR or ~/.photoncloud-test-cluster];
    /// profiles with a state suffix use a `-<suffix>` sibling.
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Build the cluster's images (cached under the state directory by recipe hash).
    Build,
    /// Boot every node in dependency order and wait until each is ready
    /// (SSH answers and its expected systemd units are active).
    Start(StartArgs),
    /// Show state, pid, accel, ports, uptime and units of every node.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Open a shell on a node, or run one command there and pass on its exit code.
    ///   photon-cluster ssh node04                            # a shell
    ///   photon-cluster ssh node04 'journalctl -u etcd | tail'  # one shell command line
    ///   photon-cluster ssh node04 -- printf '%s\n' 'a b' c    # a program and its arguments
    /// One argument is a command line for the guest's shell; several are a
    /// program and its arguments, each passed with its quoting intact.
    #[command(verbatim_doc_comment)]
    Ssh {
        /// The node, e.g. node04.
        #[arg(add = node_names())]
        node: String,
        /// A command to run instead of an interactive shell.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Power every node down over QMP; kill what has not stopped after the grace period.
    Stop {
        /// Seconds to wait for a clean powerdown before killing.
        #[arg(long, default_value_t = 30)]
        grace: u64,
    },
    /// Stop the cluster if it runs and remove its runtime state (keys, overlays, logs).
    Clean {
        /// Also remove the built images and the cached KVM probe.
        #[arg(long)]
        all: bool,
    },
    /// Save, list or remove snapshots of the running cluster, for warm starts
    /// (`start --from-snapshot NAME`, `fresh-smoke --warm`).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Check a cluster definition and exit: 0 if valid, 2 with file:line:field if not.
    Check {
        /// Print JSON: {"valid", "source", "nodes"} or {"valid": false, "error", "kind"}.
        #[arg(long)]
        json: bool,
    },
    /// List the embedded lanes, their layers and check counts for this cluster.
    Lanes {
        /// Print JSON: [{"name", "valid", "checks", "layers", "description"}].
        #[arg(long)]
        json: bool,
    },
    /// Render report.md and report.html again from a run's result.json, with
    /// this driver (DIR is an artifact root, e.g. work/smoke/latest).
    Report {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print a shell's completion script (subcommands, options, node names):
    ///   source <(photon-cluster completions bash)
    ///   photon-cluster completions fish > ~/.config/fish/completions/photon-cluster.fish
    ///   photon-cluster completions zsh > ~/.zfunc/_photon-cluster
    #[command(verbatim_doc_comment)]
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish", "elvish", "powershell"])]
        shell: String,
    },
    /// Print the man page (roff): photon-cluster man > photon-cluster.1
    Man,
    /// Print a lane's plan for this cluster without booting anything: every
    /// check on every target, with its id (`name@node`), layer, kind and
    /// origin (`file:line`). The Nix library's check ids are tested against it.
    Plan {
        #[command(flatten)]
        select: LaneSelect,
        /// Print JSON: {"lane": ..., "checks": [{"id", "layer", "kind", "target", "origin"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Hermetic lane run for Nix builders: boot from --image-dir, run the lane,
    /// stop, and write the artifacts straight into --out (plus
    /// nix-support/hydra-build-products). No HOME needed: state goes under
    /// $TMPDIR unless --state-dir is given. Images and tools must be in the
    /// Nix store unless allowed with --allow-impure.
    Run(RunArgs),
    /// Preflight that boots nothing: host programs, KVM, nested virtualization,
    /// memory, disk, free ports, the cluster and lane definitions, the images.
    /// Exit 1 if an item fails; each item that is not a pass has a hint.
    Validate {
        #[command(flatten)]
        select: LaneSelect,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a lane (default: smoke, every validation layer) against the running
    /// cluster and write its artifacts.
    Smoke(LaneArgs),
    /// clean, build (if needed), start, smoke, stop: the whole verdict from
    /// nothing. The cluster is stopped even when a check fails.
    FreshSmoke {
        #[command(flatten)]
        lane: LaneArgs,
        #[command(flatten)]
        start: StartArgs,
    },
    /// The matrix lane against the running cluster: composed scenarios (DNS +
    /// load balancer + backends, VM live migration on shared volumes,
    /// replicated state, the gateway's metrics and auth flows).
    Matrix(LaneRun),
    /// clean, build, start, matrix, stop.
    FreshMatrix {
        #[command(flatten)]
        lane: LaneRun,
        #[command(flatten)]
        start: StartArgs,
    },
    /// The bench-storage lane against the running cluster: NBD volume I/O of
    /// a remote export against the node-local export, side by side, with ratios.
    BenchStorage(LaneRun),
    /// clean, build, start, bench-storage, stop.
    #[command(alias = "fresh-storage-bench")]
    FreshBenchStorage {
        #[command(flatten)]
        lane: LaneRun,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Provider and VM-hosting evidence in one dated root
    /// (work/provider-vm-reality-proof/<timestamp>/network-provider, vm-hosting):
    /// against the running cluster, or a fresh one (clean, build, start,
    /// lane, stop) when none runs.
    ProviderVmRealityProof {
        #[command(flatten)]
        lane: LaneRun,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Measure boot: the raw parallel boot of every guest to its console login
    /// prompt (no driver checks), then the driver's boot-to-ready of the same
    /// guests, in one run; prints both and their ratio.
    BenchBoot(StartArgs),
    /// Benchmark the driver against baselines measured side by side in one
    /// run: exec of `true` over the kept session vs a fresh OpenSSH per
    /// command, boot-to-ready vs the guests' own all-units-active moment,
    /// readiness delay, warm restore vs cold boot, peak RSS. Boots its own
    /// cluster (stop a running one first); writes bench.json.
    Bench {
        #[command(flatten)]
        start: StartArgs,
        /// Commands per side in the exec comparison.
        #[arg(long, default_value_t = 30)]
        execs: usize,
        /// Where to write the figures.
        #[arg(long, default_value = "bench.json")]
        out: PathBuf,
    },
    /// Measure TCP throughput between two guests over the driver's fabric
    /// switch against QEMU's multicast hub: boots the cluster on each in
    /// turn and times 32 MiB transfers (median, min, max, ratio).
    BenchFabric {
        #[command(flatten)]
        start: StartArgs,
        /// Sender and receiver.
        #[arg(long, default_value = "node04")]
        from: String,
        #[arg(long, default_value = "node05")]
        to: String,
        /// Transfers on each fabric.
        #[arg(long, default_value_t = 5)]
        transfers: usize,
    },
    /// Inject a fault into the running cluster: cut the fabric into groups,
    /// degrade a node's link, crash, pause or resume a node. Each prints what
    /// it did; an unknown node is refused (exit 2) and nothing changes.
    ///   photon-cluster fault partition node01,node02 node03
    ///   photon-cluster fault link node03 --loss 30% --delay 100ms
    ///   photon-cluster fault heal
    #[command(subcommand, verbatim_doc_comment)]
    Fault(FaultCmd),
    /// Boot a node again from its own overlay and config disk (after `fault
    /// crash`, or as a power cycle), and wait until it is ready.
    Restart {
        #[arg(add = node_names())]
        node: String,
        /// Seconds the node may take to become ready.
        #[arg(long, default_value_t = 600)]
        ready_timeout: u64,
    },
    /// Record every frame of the fabric into a pcap file (Wireshark, tcpdump -r).
    #[command(subcommand)]
    Capture(CaptureCmd),
    /// The fabric switch of a running cluster (started by `start`; not for people).
    #[command(hide = true)]
    FabricSwitch {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum FaultCmd {
    /// Split the nodes into groups that cannot reach each other over the
    /// fabric (comma-separated nodes per group). Nodes in no group reach all.
    Partition {
        #[arg(required = true, num_args = 2.., value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Undo the partition and every link fault.
    Heal,
    /// Degrade one node's link, in both directions (all zero: restore it).
    Link {
        #[arg(add = node_names())]
        node: String,
        /// Frames lost, e.g. 30%.
        #[arg(long, default_value = "0%", value_parser = crate::fault::parse_fraction)]
        loss: f64,
        /// Added latency, e.g. 100ms.
        #[arg(long, default_value = "0ms", value_parser = crate::fault::parse_millis)]
        delay: u64,
        /// Frames delivered twice, e.g. 5%.
        #[arg(long, default_value = "0%", value_parser = crate::fault::parse_fraction)]
        duplicate: f64,
    },
    /// Kill a node's QEMU with no clean shutdown (`restart NODE` boots it again).
    Crash {
        #[arg(add = node_names())]
        node: String,
    },
    /// Stop a node's vCPUs (QMP `stop`): a stalled machine.
    Pause {
        #[arg(add = node_names())]
        node: String,
    },
    /// Continue a paused node (QMP `cont`).
    Resume {
        #[arg(add = node_names())]
        node: String,
    },
    /// The switch's per-port frame counters, partition and link faults.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaptureCmd {
    /// Start writing every frame into FILE [default: <state>/fabric/capture-<time>.pcap].
    Start {
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Stop and close the capture file.
    Stop,
}

#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    /// Accelerator: `auto` prefers KVM and falls back to TCG (recorded and shown)
    /// when /dev/kvm is missing or a KVM guest hangs; `kvm` makes that an error.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelRequest,
    /// Seconds each node may take to become ready.
    #[arg(long, default_value_t = 600)]
    pub ready_timeout: u64,
    /// Restore a snapshot (`snapshot save`) instead of booting: every guest's
    /// memory, devices and disks as saved, resumed together, clocks set.
    /// A snapshot whose image, cluster, driver or QEMU differs is refused (exit 2).
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "default")]
    pub from_snapshot: Option<String>,
    /// Warm start: restore the `default` snapshot (`--from-snapshot default`).
    #[arg(long, conflicts_with = "from_snapshot")]
    pub warm: bool,
    /// The guests' L2 segment: `switch` (the driver's switch: partitions,
    /// link faults, capture) or `hub` (QEMU's multicast socket; no faults).
    #[arg(long, value_enum, default_value = "switch")]
    pub fabric: crate::fabric::Kind,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Pause every guest at one instant, save each one's memory, devices and
    /// disks under <state>/snapshots/NAME, then resume them (or stop them).
    Save {
        #[arg(default_value = "default")]
        name: String,
        /// Stop the cluster after saving instead of resuming it.
        #[arg(long)]
        stop: bool,
    },
    /// List the saved snapshots with their size, date and key.
    List,
    /// Remove a snapshot.
    Rm { name: String },
}

#[derive(Args, Debug, Clone)]
pub struct LaneArgs {
    #[command(flatten)]
    pub select: LaneSelect,
    #[command(flatten)]
    pub run: LaneRun,
}

/// Which lane: an embedded one by name, or a file.
#[derive(Args, Debug, Clone)]
pub struct LaneSelect {
    /// An embedded lane: smoke, matrix, bench-storage, provider-vm-reality-proof
    /// (`checks/<name>.toml`).
    #[arg(long, default_value = "smoke", conflicts_with = "lane_file")]
    pub lane: String,
    /// A lane file (TOML) instead of an embedded lane; see docs/adding-a-check.md.
    #[arg(long, value_name = "FILE")]
    pub lane_file: Option<PathBuf>,
}

/// How a lane runs, for the commands that name their lane themselves.
#[derive(Args, Debug, Clone)]
pub struct LaneRun {
    /// Root of the artifact tree: <DIR>/<lane>/<timestamp>, plus <DIR>/<lane>/latest.
    #[arg(
        long,
        value_name = "DIR",
        env = "PHOTON_ARTIFACTS",
        default_value = "work"
    )]
    pub artifacts: PathBuf,
    /// Run every layer even after one failed (later layers are skipped otherwise).
    #[arg(long)]
    pub keep_going: bool,
    /// Seconds `stop` waits for a clean powerdown before killing (fresh-* commands).
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Print the run's result.json document on stdout (the summary goes to stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub select: LaneSelect,
    /// Where the artifact tree goes (in a derivation: $out).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Prebuilt images: a directory with vmlinuz, initrd.img and rootfs.img.
    #[arg(long, value_name = "DIR")]
    pub image_dir: PathBuf,
    /// Exit 0 even when the lane fails, and write nix-support/failed, so the
    /// evidence is kept as the build output (Hydra shows it as failed).
    #[arg(long)]
    pub keep_failed: bool,
    /// A path (or prefix) outside the Nix store that may be used anyway;
    /// repeatable. Each use is recorded in result.json.
    #[arg(long, value_name = "PATH")]
    pub allow_impure: Vec<PathBuf>,
    /// Run every layer even after one failed.
    #[arg(long)]
    pub keep_going: bool,
    /// Seconds `stop` waits for a clean powerdown before killing.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Print the run's result.json document on stdout (the summary goes to stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub start: StartArgs,
}

impl LaneArgs {
    pub fn options(&self, cluster: &Cluster, command: &str) -> Result<LaneOptions> {
        Ok(self.run.options(self.select.load(cluster)?, command))
    }
}

impl LaneSelect {
    pub fn load(&self, cluster: &Cluster) -> Result<Lane> {
        Ok(match &self.lane_file {
            Some(f) => Lane::load(f, cluster)?,
            None => Lane::embedded(&self.lane, cluster)?,
        })
    }
}

impl LaneRun {
    pub fn options(&self, lane: Lane, command: &str) -> LaneOptions {
        LaneOptions {
            command: command.into(),
            lane,
            artifacts: self.artifacts.clone(),
            keep_going: self.keep_going,
            grace: Duration::from_secs(self.grace),
            json: self.json,
        }
    }
}

impl StartArgs {
    /// Start options for `command`; with `keep_owner` the command keeps
    /// owning the guests after they are ready (it stops them itself).
    pub fn options(&self, command: &str, keep_owner: bool) -> StartOptions {
        StartOptions {
            command: command.into(),
            keep_owner,
            accel: self.accel,
            ready_timeout: Duration::from_secs(self.ready_timeout),
            readiness: cluster::Readiness::Full,
            from_snapshot: match (&self.from_snapshot, self.warm) {
                (Some(name), _) => Some(name.clone()),
                (None, true) => Some(crate::snapshot::DEFAULT.into()),
                (None, false) => None,
            },
            fabric: self.fabric,
        }
    }
}

impl Target {
    pub fn load(&self) -> Result<Cluster> {
        Ok(match &self.cluster {
            Some(path) => Cluster::load(path)?,
            None => Cluster::profile(&self.profile)?,
        })
    }

    pub fn state(&self, cluster: &Cluster) -> Result<StateDir> {
        StateDir::new(state::state_dir(
            self.state_dir.as_deref(),
            &cluster.state_suffix,
        )?)
    }
}

pub fn run(cli: Cli) -> Result<i32> {
    crate::log::init(
        cli.log_format,
        crate::log::default_level(cli.quiet, cli.verbose),
    );
    crate::progress::set_quiet(cli.quiet);
    if let Some(secs) = cli.timeout {
        crate::arm_timeout(Duration::from_secs(secs));
    }
    // Commands that need no cluster definition.
    match &cli.command {
        Cmd::FabricSwitch { config } => {
            let text = std::fs::read_to_string(config)?;
            crate::fabric::switch::serve(serde_json::from_str(&text)?)?;
            return Ok(0);
        }
        Cmd::Report { dir } => {
            let written = crate::report::rerender(dir)?;
            for f in written {
                println!("{}", f.display());
            }
            return Ok(0);
        }
        Cmd::Completions { shell } => {
            let shells = clap_complete::env::Shells::builtins();
            let shell = shells
                .completer(shell)
                .expect("clap checked the shell name");
            let name = "photon-cluster";
            shell.write_registration("COMPLETE", name, name, name, &mut std::io::stdout())?;
            return Ok(0);
        }
        Cmd::Man => {
            let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            man.render(&mut std::io::stdout())?;
            return Ok(0);
        }
        Cmd::Check { json: true } => return check_json(&cli.target),
        _ => {}
    }
    let name = format!("{:?}", cli.command);
    let name = name
        .split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_lowercase();
    let _command = tracing::info_span!("command", name).entered();
    let cluster = cli.target.load()?;
    if let Cmd::Run(args) = &cli.command {
        return hermetic_run(cluster, &cli.target, args);
    }
    let state = cli.target.state(&cluster)?;
    // Guests of a killed `start` or `fresh-*` must not outlive it for long:
    // any command on the state directory reaps them, and says so.
    if let Some(note) = cluster::reap_abandoned(&state)? {
        tracing::warn!("{note}");
    }
    match cli.command {
        Cmd::Run(_) => unreachable!("handled above"),
        Cmd::Report { .. } | Cmd::Completions { .. } | Cmd::Man => unreachable!("handled above"),
        Cmd::Check { .. } => {
            println!(
                "{}: valid ({} nodes)",
                cluster.source.display(),
                cluster.nodes.len()
            );
        }
        Cmd::Plan { select, json } => {
            let lane = select.load(&cluster)?;
            if json {
                let checks: Vec<serde_json::Value> = lane
                    .checks()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id, "layer": c.layer, "kind": c.kind,
                            "target": c.target, "origin": c.origin,
                        })
                    })
                    .collect();
                let doc = serde_json::json!({ "lane": lane.name, "checks": checks });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                for c in lane.checks() {
                    println!("{:<14} {:<40} {:<14} {}", c.layer, c.id, c.kind, c.origin);
                }
            }
        }
        Cmd::Lanes { json: true } => {
            let lanes: Vec<serde_json::Value> = crate::lane::LANES
                .iter()
                .map(|(name, _)| match Lane::embedded(name, &cluster) {
                    Ok(l) => serde_json::json!({
                        "name": name, "valid": true, "checks": l.check_count(),
                        "layers": l.layers.iter().map(|l| &l.name).collect::<Vec<_>>(),
                        "description": l.description,
                    }),
                    Err(e) => {
                        serde_json::json!({ "name": name, "valid": false, "error": e.message })
                    }
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&lanes)?);
        }
        Cmd::Lanes { json: false } => {
            for (name, _) in crate::lane::LANES {
                match Lane::embedded(name, &cluster) {
                    Ok(l) => {
                        println!(
                            "{name:<28} {:>3} checks  {}",
                            l.check_count(),
                            l.description
                        );
                        let layers: Vec<&str> = l.layers.iter().map(|l| l.name.as_str()).collect();
                        println!("{:<28} layers: {}", "", layers.join(", "));
                    }
                    Err(e) => println!("{name:<28} not valid for this cluster: {}", e.message),
                }
            }
        }
        Cmd::Validate { select, json } => {
            let lane = select.load(&cluster)?;
            let items = crate::validate::run(&cluster, &state, &lane);
            if json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                crate::validate::print(&items);
            }
            let failed = items
                .iter()
                .any(|i| i.outcome == crate::check::Outcome::Fail);
            return Ok(if failed { 1 } else { 0 });
        }
        Cmd::Smoke(lane) => {
            let opts = lane.options(&cluster, "smoke")?;
            let _lock = state.lock("smoke")?;
            return Ok(smoke::smoke(&cluster, &state, &opts)? as i32);
        }
        Cmd::FreshSmoke { lane, start } => {
            let opts = lane.options(&cluster, "fresh-smoke")?;
            let _lock = state.lock("fresh-smoke")?;
            return Ok(smoke::fresh_smoke(
                &cluster,
                &state,
                &opts,
                &start.options("fresh-smoke", true),
            )? as i32);
        }
        Cmd::Matrix(run) => return lane_on_running(&cluster, &state, "matrix", &run),
        Cmd::BenchStorage(run) => return lane_on_running(&cluster, &state, "bench-storage", &run),
        Cmd::FreshMatrix { lane, start } => {
            return fresh_lane(&cluster, &state, "matrix", &lane, &start, "fresh-matrix");
        }
        Cmd::FreshBenchStorage { lane, start } => {
            let cmd = "fresh-bench-storage";
            return fresh_lane(&cluster, &state, "bench-storage", &lane, &start, cmd);
        }
        Cmd::ProviderVmRealityProof { lane, start } => {
            let name = "provider-vm-reality-proof";
            return if state.load_running()?.is_some() {
                lane_on_running(&cluster, &state, name, &lane)
            } else {
                fresh_lane(&cluster, &state, name, &lane, &start, name)
            };
        }
        Cmd::Build => {
            let _lock = state.lock("build")?;
            let img = image::build(&cluster, &state)?;
            println!("kernel  {}", img.kernel.display());
            println!("initrd  {}", img.initrd.display());
            if img.rootfs.as_os_str().is_empty() {
                println!("rootfs  (none: the nodes boot from the store)");
            } else {
                println!("rootfs  {}", img.rootfs.display());
            }
        }
        Cmd::Start(args) => {
            let _lock = state.lock("start")?;
            cluster::start(&cluster, &state, &args.options("start", false))?;
            status::print(&status::collect(&require_running(&state)?), false)?;
        }
        Cmd::Status { json } => {
            let record = require_running(&state)?;
            if let Some(owner) = record.owner.as_ref().filter(|o| o.starting && o.alive()) {
                // Answer at once: the guests are still booting, and their
                // sessions belong to `start`.
                let doc = serde_json::json!({
                    "state": "starting",
                    "owner": owner,
                    "launched": record.nodes.keys().collect::<Vec<_>>(),
                });
                if json {
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                } else {
                    println!(
                        "cluster {} is starting (`{}`, pid {}): {} node(s) launched: {}",
                        record.name,
                        owner.command,
                        owner.pid,
                        record.nodes.len(),
                        record.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                return Ok(0);
            }
            status::print(&status::collect(&record), json)?;
        }
        Cmd::Ssh { node, command } => {
            let record = require_running(&state)?;
            if command.is_empty() {
                return interactive_ssh(&record, &node);
            }
            let guest = crate::guest::connect(&record, &node)?;
            let out = guest.exec(&remote_command(&command)?, Duration::from_secs(600))?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            return Ok(out.code);
        }
        Cmd::Bench { start, execs, out } => {
            let _lock = state.lock("bench")?;
            crate::bench::suite(&cluster, &state, &start.options("bench", true), execs, &out)?;
        }
        Cmd::BenchBoot(args) => {
            let _lock = state.lock("bench-boot")?;
            crate::bench::boot(&cluster, &state, &args.options("bench-boot", true))?;
        }
        Cmd::Stop { grace } => {
            let _lock = state.lock("stop")?;
            let notes = cluster::stop(&state, Duration::from_secs(grace))?;
            if notes.is_empty() {
                println!("no cluster running in {}", state.root);
            }
            for (node, note) in notes {
                println!("{node}: {note}");
            }
        }
        Cmd::Snapshot(cmd) => snapshot_command(&cluster, &state, cmd)?,
        Cmd::BenchFabric {
            start,
            from,
            to,
            transfers,
        } => {
            let _lock = state.lock("bench-fabric")?;
            let opts = start.options("bench-fabric", true);
            crate::bench::fabric(&cluster, &state, &opts, (&from, &to), transfers)?;
        }
        Cmd::Fault(cmd) => fault_command(&require_running(&state)?, cmd)?,
        Cmd::Restart {
            node,
            ready_timeout,
        } => {
            let record = require_running(&state)?;
            let timeout = Duration::from_secs(ready_timeout);
            println!("{}", crate::fault::restart(&record, &node, timeout)?.0);
        }
        Cmd::Capture(CaptureCmd::Start { file }) => {
            let file = file.unwrap_or_else(|| {
                let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
                state
                    .root
                    .join(format!("fabric/capture-{stamp}.pcap"))
                    .into()
            });
            println!(
                "{}",
                crate::fault::capture_start(&require_running(&state)?, &file)?
            );
        }
        Cmd::Capture(CaptureCmd::Stop) => {
            match crate::fault::capture_stop(&require_running(&state)?)? {
                (Some(file), frames) => println!("{frames} frames in {}", file.display()),
                (None, _) => println!("no capture was running"),
            }
        }
        Cmd::FabricSwitch { .. } => unreachable!("handled above"),
        Cmd::Clean { all } => {
            let _lock = state.lock("clean")?;
            cluster::clean(&state, all)?;
            println!("cleaned {}", state.root);
        }
    }
    Ok(0)
}

fn fault_command(record: &RunningCluster, cmd: FaultCmd) -> Result<()> {
    use crate::fault;
    let said = match cmd {
        FaultCmd::Partition { groups } => {
            let groups: Vec<Vec<String>> = groups
                .iter()
                .map(|g| g.split(',').map(|n| n.trim().to_string()).collect())
                .collect();
            fault::partition(record, &groups)?
        }
        FaultCmd::Heal => fault::heal(record)?,
        FaultCmd::Link {
            node,
            loss,
            delay,
            duplicate,
        } => {
            let f = crate::fabric::switch::LinkFault {
                loss,
                delay_ms: delay,
                duplicate,
            };
            fault::link(record, &node, f)?
        }
        FaultCmd::Crash { node } => fault::crash(record, &node)?,
        FaultCmd::Pause { node } => fault::pause(record, &node, true)?,
        FaultCmd::Resume { node } => fault::pause(record, &node, false)?,
        FaultCmd::Status { json } => {
            let s = fault::fabric_status(record)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let mut out = format!(
                "partition: {}\n",
                match &s.partition {
                    Some(g) => g
                        .iter()
                        .map(|g| g.join(","))
                        .collect::<Vec<_>>()
                        .join(" | "),
                    None => "none".into(),
                }
            );
            for p in &s.ports {
                let link = s.links.get(&p.node).copied().unwrap_or_default();
                out.push_str(&format!(
                    "{:<10} rx {:>9} tx {:>9} dropped {:>7} (partition) {:>7} (loss)  \
                     loss {:.0}% delay {} ms dup {:.0}%\n",
                    p.node,
                    p.rx_frames,
                    p.tx_frames,
                    p.dropped_partition,
                    p.dropped_loss,
                    link.loss * 100.0,
                    link.delay_ms,
                    link.duplicate * 100.0
                ));
            }
            out.trim_end().to_string()
        }
    };
    println!("{said}");
    Ok(())
}

fn snapshot_command(cluster: &Cluster, state: &StateDir, cmd: SnapshotCmd) -> Result<()> {
    use crate::snapshot::{self, After};
    match cmd {
        SnapshotCmd::Save { name, stop } => {
            let _lock = state.lock("snapshot save")?;
            let record = require_running(state)?;
            let key = snapshot::key(cluster, &record.image)?;
            // The command line each QEMU really runs, for the restore to match.
            let machines = crate::bench::running_machines(&record)?;
            let after = if stop { After::Stop } else { After::Resume };
            let t = std::time::Instant::now();
            let m = snapshot::save(state, &record, key, machines, &name, after)?;
            if stop {
                let _ = std::fs::remove_file(state.cluster_file());
            }
            println!(
                "snapshot {:?}: {} nodes, {:.0} MiB in {:.1} s (guests paused {:.1} s); {}",
                m.name,
                m.record.nodes.len(),
                m.bytes as f64 / 1048576.0,
                t.elapsed().as_secs_f64(),
                m.paused_s,
                if stop {
                    "cluster stopped"
                } else {
                    "cluster resumed"
                }
            );
        }
        SnapshotCmd::List => {
            for m in snapshot::list(state)? {
                println!(
                    "{:<16} {:>7.0} MiB  {}  image {}  driver {}",
                    m.name,
                    m.bytes as f64 / 1048576.0,
                    m.created,
                    m.key.image,
                    m.key.driver
                );
            }
        }
        SnapshotCmd::Rm { name } => {
            let _lock = state.lock("snapshot rm")?;
            snapshot::remove(state, &name)?;
            println!("removed snapshot {name:?}");
        }
    }
    Ok(())
}

/// `run`: checks the store paths before anything starts, then runs the lane.
fn hermetic_run(mut cluster: Cluster, target: &Target, args: &RunArgs) -> Result<i32> {
    let mut paths = crate::hermetic::use_image_dir(&mut cluster, &args.image_dir)?;
    paths.extend(crate::hermetic::tool_paths()?);
    paths.push(("driver".into(), std::env::current_exe()?));
    let checked =
        crate::hermetic::check_paths(&paths, &crate::hermetic::store_dir(), &args.allow_impure)?;
    let base = match &target.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join("photon-state"),
    };
    let state = StateDir::new(state::state_dir(Some(&base), &cluster.state_suffix)?)?;
    let opts = LaneOptions {
        command: "run".into(),
        lane: args.select.load(&cluster)?,
        artifacts: args.out.clone(),
        keep_going: args.keep_going,
        grace: Duration::from_secs(args.grace),
        json: args.json,
    };
    let _lock = state.lock("run")?;
    let code = smoke::hermetic(
        &cluster,
        &state,
        &opts,
        &args.start.options("run", true),
        &args.out,
        checked,
        args.keep_failed,
    )?;
    Ok(code as i32)
}

/// An embedded lane against the running cluster (`smoke --lane <name>`),
/// from the command of the lane's name.
fn lane_on_running(cluster: &Cluster, state: &StateDir, lane: &str, run: &LaneRun) -> Result<i32> {
    let opts = run.options(Lane::embedded(lane, cluster)?, lane);
    let _lock = state.lock(lane)?;
    Ok(smoke::smoke(cluster, state, &opts)? as i32)
}

/// An embedded lane on a fresh cluster (`fresh-smoke --lane <name>`).
fn fresh_lane(
    cluster: &Cluster,
    state: &StateDir,
    lane: &str,
    run: &LaneRun,
    start: &StartArgs,
    command: &str,
) -> Result<i32> {
    let opts = run.options(Lane::embedded(lane, cluster)?, command);
    let _lock = state.lock(&format!("fresh-{lane}"))?;
    Ok(smoke::fresh_smoke(cluster, state, &opts, &start.options(command, true))? as i32)
}

/// `check --json`: the verdict as JSON on stdout, also when it is invalid
/// (exit 2, as without --json).
fn check_json(target: &Target) -> Result<i32> {
    let (doc, code) = match target.load() {
        Ok(c) => (
            serde_json::json!({
                "valid": true, "source": c.source, "name": c.name,
                "nodes": c.node_names().collect::<Vec<_>>(),
            }),
            0,
        ),
        Err(e) => (
            serde_json::json!({
                "valid": false, "error": format!("{e:#}"),
                "kind": crate::error::kind_of(&e).name(),
            }),
            crate::error::exit_code(&e) as i32,
        ),
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(code)
}

/// What `ssh NODE CMD...` runs: one argument is a shell command line as
/// typed; several are a program and its arguments, each quoted for the
/// guest's shell so that spaces and quotes arrive as they were given.
fn remote_command(args: &[String]) -> Result<String> {
    match args {
        [line] => Ok(line.clone()),
        _ => shlex::try_join(args.iter().map(String::as_str))
            .map_err(|e| bad_input(format!("ssh: cannot quote the command: {e}"))),
    }
}

/// Node names for shell completion: the running cluster's in the default
/// state directory, else the embedded reference profile's.
fn node_names() -> clap_complete::engine::ArgValueCandidates {
    clap_complete::engine::ArgValueCandidates::new(|| {
        let running = Cluster::profile("reference").ok().and_then(|c| {
            let state = StateDir::new(state::state_dir(None, &c.state_suffix).ok()?).ok()?;
            let record = state.load_running().ok()??;
            Some(record.nodes.keys().cloned().collect::<Vec<_>>())
        });
        let names = running.unwrap_or_else(|| {
            Cluster::profile("reference")
                .map(|c| c.node_names().map(String::from).collect())
                .unwrap_or_default()
        });
        names.into_iter().map(Into::into).collect()
    })
}

fn require_running(state: &StateDir) -> Result<RunningCluster> {
    state.load_running()?.ok_or_else(|| {
        bad_input(format!(
            "no cluster is running in {}; run `photon-cluster start` first",
            state.root
        ))
    })
}

/// Hands the terminal to OpenSSH for an interactive shell, pinned to the
/// cluster's key and the host keys the driver gave each node.
fn interactive_ssh(record: &RunningCluster, node: &str) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let n = record
        .nodes
        .get(node)
        .ok_or_else(|| bad_input(format!("no node {node:?} in the running cluster")))?;
    if !machine::is_running(n.pid_now()) {
        anyhow::bail!("{node}: QEMU (pid {}) is not running", n.pid_now());
    }
    let err = crate::guest::openssh(record, node).exec();
    Err(err).context("running ssh (install openssh-client)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        // Duplicate names, bad defaults, conflicts naming missing arguments.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn ssh_keeps_one_command_line_and_quotes_several_arguments() {
        let one = vec!["journalctl -u etcd | tail".to_string()];
        assert_eq!(remote_command(&one).unwrap(), "journalctl -u etcd | tail");
        let argv: Vec<String> = ["printf", "%s|", "a b", "it's", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            remote_command(&argv).unwrap(),
            r#"printf '%s|' 'a b' "it's" ''"#
        );
    }

    #[test]
    fn lane_commands_name_their_lane_and_keep_the_seed_aliases() {
        let cli = Cli::try_parse_from(["photon-cluster", "fresh-storage-bench", "--accel", "tcg"])
            .unwrap();
        assert!(matches!(cli.command, Cmd::FreshBenchStorage { .. }));
        // The shorthand commands have no --lane: their lane is their name.
        assert!(Cli::try_parse_from(["photon-cluster", "matrix", "--lane", "smoke"]).is_err());
        let cli = Cli::try_parse_from(["photon-cluster", "smoke", "--lane", "matrix"]).unwrap();
        match cli.command {
            Cmd::Smoke(args) => assert_eq!(args.select.lane, "matrix"),
            c => panic!("{c:?}"),
        }
    }
}
