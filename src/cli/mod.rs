//! Command-line definitions: commands, their arguments and help. What each
//! command does is in `run.rs`.

mod run;

pub use run::run;

use crate::cluster::{self, StartOptions};
use crate::lane::Lane;
use crate::machine::accel::AccelRequest;
use crate::smoke::LaneOptions;
use crate::spec::Cluster;
use crate::state::{self, StateDir};
use anyhow::Result;
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
    /// An embedded profile: `reference` (six nodes) or `reference-storage`
    /// (five storage nodes) [default: reference-storage for the storage
    /// benchmarks, else reference].
    #[arg(long, global = true, conflicts_with = "cluster")]
    pub profile: Option<String>,
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
    /// What changed between two runs: checks that changed outcome, new and
    /// removed checks, benchmark figures that left their measured spread,
    /// boot and lane times, accel and image. OLD and NEW are artifact roots
    /// (or their result.json). Exit 1 if a check or a figure got worse,
    /// 0 if not, 2 if either is not a run (docs/compare.md).
    Compare {
        #[arg(value_name = "OLD")]
        old: PathBuf,
        #[arg(value_name = "NEW")]
        new: PathBuf,
        /// Print the comparison as JSON (schema photon-cluster/compare/v1).
        #[arg(long)]
        json: bool,
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
    /// Run a lane N times against the running cluster, each time from the
    /// same snapshot (saved now as `rerun` unless --snapshot names one), and
    /// report per check: passes, failures, pass rate, the spread of its
    /// time and figures; a check that both passed and failed is `flaky`,
    /// with a failing run's evidence beside a passing one's. Writes
    /// <artifacts>/rerun-<lane>/<timestamp>/ (run-<i>/ per run). Exit 0 if
    /// every check passed every time, 1 if one failed or was flaky, 2 on
    /// bad input. The cluster is left running, restored from the snapshot.
    Rerun(RerunArgs),
    /// clean, build (if needed), start, smoke, stop: the whole verdict from
    /// nothing. The cluster is stopped even when a check fails.
    FreshSmoke {
        #[command(flatten)]
        lane: LaneArgs,
        #[command(flatten)]
        start: StartArgs,
        #[command(flatten)]
        save: SaveReady,
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
        #[command(flatten)]
        save: SaveReady,
    },
    /// The bench-storage lane against the running storage cluster
    /// (reference-storage unless --profile/--cluster says otherwise): fio on
    /// a remote export against the node-local one, side by side, with
    /// ratios; volume materialization latency; S3 object throughput. Writes
    /// storage-benchmarks.md (and its charts) into the run directory, and
    /// with --publish DIR also there (the repository keeps one in docs/).
    BenchStorage(LaneRun),
    /// clean, build, start, bench-storage, stop (on reference-storage by default).
    #[command(alias = "fresh-storage-bench")]
    FreshBenchStorage {
        #[command(flatten)]
        lane: LaneRun,
        #[command(flatten)]
        start: StartArgs,
        #[command(flatten)]
        save: SaveReady,
    },
    /// The local export matrix on the running storage cluster: one
    /// qemu-storage-daemon export on one node for every cache mode x aio
    /// mode, measured with fio over NBD on 127.0.0.1, so software-path
    /// regressions can be told from network limits. Names the strongest
    /// profile; combinations the node refuses are `unsupported`, not failed.
    /// Against a fresh cluster (clean, build, start, lane, stop) when none runs.
    BenchCoronafsLocalMatrix {
        #[command(flatten)]
        lane: LaneRun,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Run a Python test script (NixOS test driver names: node01.succeed,
    /// wait_for_unit, subtest, ...) against the running cluster (or a fresh
    /// one with --fresh); its subtests and steps land in result.json,
    /// junit.xml and report.html. See docs/scripts.md.
    Script {
        /// The script (Python 3, standard library; its module is provided).
        #[arg(required_unless_present = "interactive")]
        file: Option<PathBuf>,
        /// A Python prompt instead of a script, with the same objects (one
        /// per node, `start_all`, `partition`, ...) on the running cluster,
        /// as NixOS's `driverInteractive`. End it with Ctrl-D; Ctrl-C stops
        /// the command at the prompt, not the cluster.
        #[arg(long, conflicts_with_all = ["file", "fresh"])]
        interactive: bool,
        /// The script's time limit, in seconds.
        #[arg(long, default_value_t = 1800)]
        deadline: u64,
        /// On a fresh cluster (clean, build, start, script, stop), like the
        /// `fresh-*` commands, instead of the running one.
        #[arg(long)]
        fresh: bool,
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
    /// NAME with a `/` is a snapshot directory of its own (a `ready --out`
    /// output, a Nix store path), read only: the disks are copied into this
    /// state directory and host ports are chosen afresh, so several restores
    /// of one snapshot run side by side.
    #[arg(long, value_name = "NAME|DIR", num_args = 0..=1, default_missing_value = "default")]
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
    /// Also copy the benchmark report (storage-benchmarks.md) and its charts
    /// into DIR, e.g. `--publish docs` in a checkout.
    #[arg(long, value_name = "DIR")]
    pub publish: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RerunArgs {
    #[command(flatten)]
    pub select: LaneSelect,
    /// How many runs (1..100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub times: u32,
    /// Start every run from this existing snapshot (`snapshot save NAME`)
    /// instead of saving the running cluster as `rerun` first.
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    /// Root of the artifact tree: <DIR>/rerun-<lane>/<timestamp>.
    #[arg(
        long,
        value_name = "DIR",
        env = "PHOTON_ARTIFACTS",
        default_value = "work"
    )]
    pub artifacts: PathBuf,
    /// Run every layer even after one failed, in every run.
    #[arg(long)]
    pub keep_going: bool,
    /// Print the rerun's result.json on stdout (the tables go to stderr).
    #[arg(long)]
    pub json: bool,
}

/// `--save-ready` of the `fresh-*` lanes.
#[derive(Args, Debug, Default)]
pub struct SaveReady {
    /// Once every node is ready, save the cluster as snapshot NAME
    /// (`default` if no NAME) before the lane runs, so that a later
    /// `fresh-* --warm` or `start --warm` restores it instead of booting.
    /// The save is a step of the run, in result.json.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "default")]
    pub save_ready: Option<String>,
}

impl SaveReady {
    /// Puts the save into a lane's options; a bad name is refused (exit 2)
    /// before anything starts.
    pub fn apply(self, opts: &mut LaneOptions) -> Result<()> {
        if let Some(name) = &self.save_ready {
            crate::snapshot::check_name(name)?;
        }
        opts.save_ready = self.save_ready;
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub select: LaneSelect,
    /// Where the artifact tree goes (in a derivation: $out).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Prebuilt images: a directory with vmlinuz, initrd.img and rootfs.img
    /// (not needed with --assemble).
    #[arg(long, value_name = "DIR", required_unless_present = "assemble")]
    pub image_dir: Option<PathBuf>,
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
    /// Only boot the cluster and save it, ready, into --out (a snapshot
    /// directory with the boot timeline and consoles): the `<cluster>-ready`
    /// derivation. No lane runs.
    #[arg(long, conflicts_with_all = ["from_ready", "assemble"])]
    pub ready: bool,
    /// Restore the ready cluster saved in DIR (by `run --ready`) instead of
    /// booting: the disks are copied here, DIR is only read.
    #[arg(
        long,
        value_name = "DIR",
        requires = "layer",
        conflicts_with = "assemble"
    )]
    pub from_ready: Option<PathBuf>,
    /// With --from-ready: run only this layer of the lane.
    #[arg(long, value_name = "NAME", requires = "from_ready")]
    pub layer: Option<String>,
    /// With --layer: also save the cluster's end state into <out>/end, for
    /// a later layer that says `after = "<this layer>"`.
    #[arg(long, requires = "layer")]
    pub save_end: bool,
    /// Run the lane as its graph of layers, as a Nix build of
    /// mkLayeredCheck does but without Nix: the ready cluster once, then
    /// each layer in a restore of its own, N at a time (a layer with
    /// `after` once that layer saved its end), then the lane assembled in
    /// --out. Each layer's log is kept in <out>/jobs/.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..),
          conflicts_with_all = ["ready", "from_ready", "assemble"])]
    pub jobs: Option<u16>,
    /// Boot nothing: assemble the lane's artifacts in --out from the
    /// outputs of its layers (`run --from-ready ... --layer`), in order;
    /// repeatable.
    #[arg(long, value_name = "DIR")]
    pub assemble: Vec<PathBuf>,
    #[command(flatten)]
    pub start: StartArgs,
}

impl LaneArgs {
    pub fn options(&self, cluster: &Cluster, command: &str) -> Result<LaneOptions> {
        Ok(self.run.options(self.select.load(cluster)?, command))
    }
}

impl RerunArgs {
    pub fn options(&self, cluster: &Cluster) -> Result<crate::rerun::RerunOptions> {
        let lane = LaneOptions {
            command: "rerun".into(),
            lane: self.select.load(cluster)?,
            artifacts: self.artifacts.clone(),
            keep_going: self.keep_going,
            // Unused: each restore discards the guests it replaces.
            grace: Duration::from_secs(1),
            json: self.json,
            publish: None,
            save_end: None,
            save_ready: None,
        };
        Ok(crate::rerun::RerunOptions {
            lane,
            times: self.times,
            snapshot: self.snapshot.clone(),
        })
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
            publish: self.publish.clone(),
            save_end: None,
            save_ready: None,
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

impl Cmd {
    /// The profile a command runs on when none is named: the storage
    /// benchmarks need the storage nodes, everything else the reference cluster.
    pub fn default_profile(&self) -> &'static str {
        crate::lane::default_profile(match self {
            Cmd::BenchStorage(_) | Cmd::FreshBenchStorage { .. } => "bench-storage",
            Cmd::BenchCoronafsLocalMatrix { .. } => "bench-coronafs-local-matrix",
            _ => "",
        })
    }
}

impl Target {
    /// The cluster named on the command line, else `default_profile`
    /// (the command's own: see `Cmd::default_profile`).
    pub fn load(&self, default_profile: &str) -> Result<Cluster> {
        Ok(match (&self.cluster, &self.profile) {
            (Some(path), _) => Cluster::load(path)?,
            (None, Some(profile)) => Cluster::profile(profile)?,
            (None, None) => Cluster::profile(default_profile)?,
        })
    }

    pub fn state(&self, cluster: &Cluster) -> Result<StateDir> {
        StateDir::new(state::state_dir(
            self.state_dir.as_deref(),
            &cluster.state_suffix,
        )?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        // Duplicate names, bad defaults, conflicts naming missing arguments.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn lane_commands_name_their_lane_and_keep_the_seed_aliases() {
        let cli = Cli::try_parse_from(["photon-cluster", "fresh-storage-bench", "--accel", "tcg"])
            .unwrap();
        assert!(matches!(cli.command, Cmd::FreshBenchStorage { .. }));
        // The storage benchmarks run on the storage nodes unless told otherwise.
        assert_eq!(cli.command.default_profile(), "reference-storage");
        let cli = Cli::try_parse_from(["photon-cluster", "bench-coronafs-local-matrix"]).unwrap();
        assert_eq!(cli.command.default_profile(), "reference-storage");
        let cli = Cli::try_parse_from(["photon-cluster", "matrix"]).unwrap();
        assert_eq!(cli.command.default_profile(), "reference");
        let cli =
            Cli::try_parse_from(["photon-cluster", "--profile", "reference", "bench-storage"])
                .unwrap();
        assert_eq!(cli.target.profile.as_deref(), Some("reference"));
        // The shorthand commands have no --lane: their lane is their name.
        assert!(Cli::try_parse_from(["photon-cluster", "matrix", "--lane", "smoke"]).is_err());
        let cli = Cli::try_parse_from(["photon-cluster", "smoke", "--lane", "matrix"]).unwrap();
        match cli.command {
            Cmd::Smoke(args) => assert_eq!(args.select.lane, "matrix"),
            c => panic!("{c:?}"),
        }
    }
}
