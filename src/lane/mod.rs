//! Lanes: ordered layers of checks, written as TOML under `checks/`.
//!
//! A lane file is data only. Loading it validates every check against the
//! cluster (targets, forwards, kinds), and expands it into a plan: one
//! `PlannedCheck` per (check, target node), with `{node}`-style
//! placeholders filled in (`placeholders`). The engine never sees TOML.

mod placeholders;

use crate::check::{Check, Kind};
use crate::spec::{Cluster, SpecError};
use serde::Deserialize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

pub use placeholders::placeholders;

/// The lanes shipped with the binary, from `checks/`.
pub const LANES: &[(&str, &str)] = &[
    ("smoke", include_str!("../../checks/smoke.toml")),
    ("matrix", include_str!("../../checks/matrix.toml")),
    (
        "bench-storage",
        include_str!("../../checks/bench-storage.toml"),
    ),
    (
        "bench-coronafs-local-matrix",
        include_str!("../../checks/bench-coronafs-local-matrix.toml"),
    ),
    (
        "provider-vm-reality-proof",
        include_str!("../../checks/provider-vm-reality-proof.toml"),
    ),
];

/// Lanes written for one profile in another form: (lane, cluster name,
/// text). `bench-storage` on the six-node reference cluster has no storage
/// nodes, so there it measures the workers' exports as it always did.
const PROFILE_LANES: &[(&str, &str, &str)] = &[(
    "bench-storage",
    "reference",
    include_str!("../../checks/bench-storage.reference.toml"),
)];

/// The profile an embedded lane runs on when the command line names none:
/// the storage benchmarks need the storage nodes.
pub fn default_profile(lane: &str) -> &'static str {
    match lane {
        "bench-storage" | "bench-coronafs-local-matrix" => "reference-storage",
        _ => "reference",
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LaneFile {
    lane: LaneHeader,
    #[serde(default)]
    layer: Vec<LayerDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LaneHeader {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerDef {
    name: String,
    #[serde(default)]
    description: String,
    /// The earlier layer whose end state this one continues from, when
    /// the lane runs layer by layer (docs/nix.md, `mkLayeredCheck`).
    #[serde(default)]
    after: Option<Spanned<String>>,
    #[serde(default)]
    check: Vec<Spanned<toml::Table>>,
}

/// Where a check runs: `all`, `role:<role>`, or node names.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Targets {
    One(String),
    Many(Vec<String>),
}

/// A lane, expanded against one cluster.
#[derive(Debug, Clone)]
pub struct Lane {
    pub name: String,
    pub description: String,
    pub source: PathBuf,
    /// The cluster it was expanded against.
    pub cluster: String,
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub description: String,
    /// `after = "<layer>"`: an earlier layer of the lane whose end state
    /// this one starts from when layers run apart (a whole-lane run runs
    /// them in order anyway).
    pub after: Option<String>,
    pub checks: Vec<PlannedCheck>,
}

/// One check on one target, ready to run.
#[derive(Debug, Clone)]
pub struct PlannedCheck {
    /// `<check name>@<node>`, or the bare name for checks without a target.
    pub id: String,
    pub layer: String,
    pub target: Option<String>,
    pub deadline: Duration,
    /// The kind's name, as the lane file wrote it.
    pub kind: &'static str,
    /// How the engine runs it: the kind's shape.
    pub shape: crate::check::Shape,
    pub check: Arc<dyn Check>,
    /// Where it was defined, for messages: `checks/smoke.toml:42`.
    pub origin: String,
    /// A file under the run directory that receives the check's evidence
    /// (`network-provider/dns-{node}.json`); see report::write_check_artifacts.
    pub artifact: Option<String>,
    /// A known flaky check (`flaky = { reason, reruns }`): a failure is
    /// retried from the snapshot, and a pass after that is `flaky`.
    pub flaky: Option<FlakyMark>,
}

/// `flaky = { reason = "...", reruns = N }` on a check in a lane file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakyMark {
    /// Why the check is known to be flaky (an issue, a race): required.
    pub reason: String,
    /// How many times a failure is retried from the snapshot.
    pub reruns: u32,
}

/// More reruns than this hides a broken check rather than a flaky one.
pub const MAX_RERUNS: u32 = 5;

impl FlakyMark {
    /// Reads a check's `flaky` value: a table with a non-empty reason and
    /// 1..=MAX_RERUNS reruns, else the message to show at its line.
    fn parse(v: toml::Value) -> Result<FlakyMark, String> {
        let usage = format!("flaky = {{ reason = \"why it is flaky\", reruns = 1..{MAX_RERUNS} }}");
        let mark =
            FlakyMark::deserialize(v).map_err(|e| format!("{}; write {usage}", e.message()))?;
        if mark.reason.trim().is_empty() {
            return Err(format!("a flaky mark needs a reason; write {usage}"));
        }
        if mark.reruns == 0 || mark.reruns > MAX_RERUNS {
            return Err(format!(
                "reruns = {} is not 1..{MAX_RERUNS}; write {usage}",
                mark.reruns
            ));
        }
        Ok(mark)
    }
}

impl Lane {
    /// Every check of the lane, in lane order.
    pub fn checks(&self) -> impl Iterator<Item = &PlannedCheck> {
        self.layers.iter().flat_map(|l| l.checks.iter())
    }

    /// Loads an embedded lane by name.
    pub fn embedded(name: &str, cluster: &Cluster) -> Result<Lane, SpecError> {
        let variant = PROFILE_LANES
            .iter()
            .find(|(n, c, _)| *n == name && *c == cluster.name)
            .map(|(_, c, t)| (format!("{name}.{c}"), *t));
        let (file, text) = variant
            .or_else(|| {
                LANES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, t)| (name.to_string(), *t))
            })
            .ok_or_else(|| {
                SpecError::at(
                    Path::new("--lane"),
                    "",
                    None,
                    "lane",
                    format!(
                        "unknown lane {name:?} (embedded lanes: {})",
                        LANES.iter().map(|l| l.0).collect::<Vec<_>>().join(", ")
                    ),
                )
            })?;
        parse(
            Path::new(&format!("<embedded>/checks/{file}.toml")),
            text,
            cluster,
        )
    }

    /// Loads a lane file from disk.
    pub fn load(path: &Path, cluster: &Cluster) -> Result<Lane, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError::at(path, "", None, "file", format!("cannot read: {e}")))?;
        parse(path, &text, cluster)
    }

    pub fn check_count(&self) -> usize {
        self.layers.iter().map(|l| l.checks.len()).sum()
    }
}

/// Parses `text` (read from `file`) and expands it against `cluster`.
pub fn parse(file: &Path, text: &str, cluster: &Cluster) -> Result<Lane, SpecError> {
    let at = |span: Option<Range<usize>>, field: &str, msg: String| {
        SpecError::at(file, text, span, field, msg)
    };
    let def: LaneFile = toml::from_str(text).map_err(|e| SpecError::from_toml(file, text, &e))?;
    if def.layer.is_empty() {
        return Err(at(None, "layer", "the lane defines no [[layer]]".into()));
    }
    let mut layers = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (li, layer) in def.layer.iter().enumerate() {
        let after = layer.after.as_ref().map(|a| a.get_ref().clone());
        if let Some(a) = &layer.after
            && !def.layer[..li].iter().any(|l| l.name == *a.get_ref())
        {
            let earlier: Vec<&str> = def.layer[..li].iter().map(|l| l.name.as_str()).collect();
            return Err(at(
                Some(a.span()),
                &format!("layer[{li}].after"),
                format!(
                    "{:?} is not an earlier layer of this lane (earlier: {})",
                    a.get_ref(),
                    if earlier.is_empty() {
                        "none".into()
                    } else {
                        earlier.join(", ")
                    }
                ),
            ));
        }
        let mut checks = Vec::new();
        for (ci, spanned) in layer.check.iter().enumerate() {
            let field = |f: &str| format!("layer[{li}].check[{ci}].{f}");
            let span = || Some(spanned.span());
            let origin = format!("{}:{}", file.display(), line_of(text, spanned.span().start));
            let mut table = spanned.get_ref().clone();
            let name = match table.remove("name") {
                // `/` separates a check from its parts (a script's
                // subtests): ids of checks and parts never collide.
                Some(toml::Value::String(s)) if s.contains('/') => {
                    return Err(at(
                        span(),
                        &field("name"),
                        format!(
                            "{s:?}: a check's name may not hold '/' (it names a script's subtests)"
                        ),
                    ));
                }
                Some(toml::Value::String(s)) => s,
                _ => {
                    return Err(at(
                        span(),
                        &field("name"),
                        "every check needs a name".into(),
                    ));
                }
            };
            let deadline = match table.remove("deadline") {
                None => 30,
                Some(toml::Value::Integer(s)) if s > 0 => s as u64,
                Some(_) => {
                    return Err(at(
                        span(),
                        &field("deadline"),
                        "seconds, a positive integer".into(),
                    ));
                }
            };
            let artifact = match table.remove("artifact") {
                None => None,
                Some(toml::Value::String(a)) if artifact_path_ok(&a) => Some(a),
                Some(_) => {
                    return Err(at(
                        span(),
                        &field("artifact"),
                        "a relative path inside the run directory, e.g. \"vm-hosting/migration.json\""
                            .into(),
                    ));
                }
            };
            let flaky = match table.remove("flaky") {
                None => None,
                Some(v) => Some(FlakyMark::parse(v).map_err(|m| at(span(), &field("flaky"), m))?),
            };
            let targets = match table.remove("targets") {
                None => None,
                Some(v) => Some(Targets::deserialize(v).map_err(|_| {
                    at(
                        span(),
                        &field("targets"),
                        "a node name, \"all\", \"role:<role>\" or a list of them".into(),
                    )
                })?),
            };
            let kind_name = match table.remove("kind") {
                Some(toml::Value::String(k)) => k,
                _ => {
                    return Err(at(
                        span(),
                        &field("kind"),
                        "every check needs a kind".into(),
                    ));
                }
            };
            let kind = Kind::named(&kind_name).map_err(|m| at(span(), &field("kind"), m))?;
            // A script's file is relative to the lane file, like an include.
            if kind.name == "script"
                && let Some(toml::Value::String(f)) = table.get("file")
            {
                let dir = file.parent().unwrap_or(Path::new("."));
                let resolved = dir.join(f).to_string_lossy().into_owned();
                table.insert("file".into(), toml::Value::String(resolved));
            }
            // Read once as written, so that a wrong field is reported even
            // when the check would bind to no node.
            kind.parse(table.clone())
                .map_err(|m| at(span(), &field("kind"), m))?;
            let nodes = match targets {
                None if kind.shape.on_targets => {
                    return Err(at(
                        span(),
                        &field("targets"),
                        format!("a {} check needs `targets`", kind.name),
                    ));
                }
                None => Ok(vec![]),
                Some(Targets::One(t)) => cluster.select(&[t]),
                Some(Targets::Many(t)) => cluster.select(&t),
            };
            let nodes = match nodes {
                Ok(n) => n,
                Err(m) => return Err(at(span(), &field("targets"), m)),
            };
            let instances: Vec<Option<String>> = if nodes.is_empty() {
                vec![None]
            } else {
                nodes.into_iter().map(Some).collect()
            };
            for target in instances {
                let t = target.as_deref();
                let mut filled = toml::Value::Table(table.clone());
                placeholders::fill(&mut filled, t, cluster)
                    .map_err(|m| at(span(), &field("kind"), m))?;
                let toml::Value::Table(filled) = filled else {
                    unreachable!("a table stays a table")
                };
                let mut check = kind
                    .parse(filled)
                    .map_err(|m| at(span(), &field("kind"), m))?;
                check
                    .bind(t, cluster)
                    .map_err(|m| at(span(), &field("kind"), m))?;
                let id = match &target {
                    Some(t) => format!("{name}@{t}"),
                    None => name.clone(),
                };
                if !seen.insert(id.clone()) {
                    return Err(at(
                        span(),
                        &field("name"),
                        format!("duplicate check {id:?}"),
                    ));
                }
                let artifact = match &artifact {
                    Some(a) => Some(
                        placeholders(a, t, cluster)
                            .map_err(|m| at(span(), &field("artifact"), m))?,
                    ),
                    None => None,
                };
                checks.push(PlannedCheck {
                    id,
                    layer: layer.name.clone(),
                    target,
                    deadline: Duration::from_secs(deadline),
                    kind: kind.name,
                    shape: kind.shape,
                    check: Arc::from(check),
                    origin: origin.clone(),
                    artifact,
                    flaky: flaky.clone(),
                });
            }
        }
        layers.push(Layer {
            name: layer.name.clone(),
            description: layer.description.clone(),
            after,
            checks,
        });
    }
    Ok(Lane {
        name: def.lane.name,
        description: def.lane.description,
        source: file.to_path_buf(),
        cluster: cluster.name.clone(),
        layers,
    })
}

/// Relative, and never climbing out of the run directory.
fn artifact_path_ok(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Cluster {
        Cluster::profile("reference").unwrap()
    }

    /// docs/scripts.md writes one scenario three ways; its lane must be one.
    #[test]
    fn the_lane_in_docs_scripts_md_expands_against_the_reference_cluster() {
        let doc = include_str!("../../docs/scripts.md");
        let from = doc
            .find("```toml\n[lane]\nname = \"partition-by-lane\"")
            .unwrap();
        let text = &doc[from + "```toml\n".len()..];
        let text = &text[..text.find("```").unwrap()];
        let lane = parse(Path::new("docs/scripts.md"), text, &reference())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lane.check_count(), 5);
    }

    #[test]
    fn embedded_lanes_expand_against_their_profiles() {
        for (name, _) in LANES {
            let cluster = Cluster::profile(default_profile(name)).unwrap();
            let lane = Lane::embedded(name, &cluster).unwrap_or_else(|e| panic!("{e}"));
            assert!(lane.check_count() > 0, "{name}");
        }
        // bench-storage also runs on the reference cluster, in its own form.
        let lane = Lane::embedded("bench-storage", &reference()).unwrap();
        assert!(lane.source.ends_with("bench-storage.reference.toml"));
        assert!(lane.checks().any(|c| c.kind == "volume_bench"));
    }

    /// The PhotonCloud lanes cannot run here (no PhotonCloud), but they must
    /// stay valid against the PhotonCloud cluster files.
    #[test]
    fn photoncloud_lanes_expand_against_their_clusters() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let main = Cluster::load(&root.join("nix/test-cluster/cluster.toml")).unwrap();
        let storage = Cluster::load(&root.join("nix/test-cluster/storage-cluster.toml")).unwrap();
        for lane in [
            "smoke",
            "matrix",
            "provider-vm-reality-proof",
            "bench-storage",
        ] {
            let cluster = if lane == "bench-storage" {
                &storage
            } else {
                &main
            };
            let file = root.join(format!("checks/photoncloud/{lane}.toml"));
            let parsed = Lane::load(&file, cluster).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(parsed.name, lane);
            assert!(parsed.check_count() > 1, "{lane}");
        }
    }

    #[test]
    fn after_names_an_earlier_layer_or_is_refused_at_its_line() {
        let lane = |after: &str| {
            format!(
                "[lane]\nname = \"t\"\n[[layer]]\nname = \"one\"\n[[layer]]\nname = \"two\"\nafter = \"{after}\"\n"
            )
        };
        let file = Path::new("t.toml");
        let ok = parse(file, &lane("one"), &reference()).unwrap();
        assert_eq!(ok.layers[1].after.as_deref(), Some("one"));
        for bad in ["nope", "two"] {
            let e = parse(file, &lane(bad), &reference()).unwrap_err();
            assert_eq!(e.line, 7, "{e}");
            assert!(e.to_string().contains("t.toml:7"), "{e}");
            assert!(e.to_string().contains("not an earlier layer"), "{e}");
        }
    }

    #[test]
    fn a_kind_shaped_for_targets_refuses_a_check_without_them() {
        let lane = |kind: &str, fields: &str| {
            format!(
                "[lane]\nname = \"t\"\n[[layer]]\nname = \"one\"\n[[layer.check]]\nname = \"c\"\nkind = \"{kind}\"\n{fields}\n"
            )
        };
        let file = Path::new("t.toml");
        // exec is a PROBE: it runs on targets, so a check without them is refused.
        let e = parse(file, &lane("exec", "command = \"true\""), &reference()).unwrap_err();
        assert!(
            e.to_string().contains("a exec check needs `targets`"),
            "{e}"
        );
        // image is a CLUSTER_PROBE: it runs once, without a target.
        let ok = parse(file, &lane("image", ""), &reference()).unwrap();
        let c = ok.checks().next().unwrap();
        assert_eq!((c.id.as_str(), c.target.as_deref()), ("c", None));
        assert!(c.shape.retried && !c.shape.on_targets);
    }

    #[test]
    fn targets_expand_roles_and_fill_placeholders() {
        let text = r#"
[lane]
name = "t"
[[layer]]
name = "surfaces"
[[layer.check]]
name = "web"
kind = "http"
targets = "role:worker"
url = "http://{node}:8080/healthz"
"#;
        let lane = parse(Path::new("t.toml"), text, &reference()).unwrap();
        let ids: Vec<&str> = lane.layers[0]
            .checks
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        assert_eq!(ids, ["web@node04", "web@node05"]);
        let check = format!("{:?}", lane.layers[0].checks[1].check);
        assert!(check.contains("\"http://node05:8080/healthz\""), "{check}");
    }

    #[test]
    fn a_check_name_with_a_slash_is_refused_at_its_line() {
        let text = "[lane]\nname = \"t\"\n[[layer]]\nname = \"x\"\n[[layer.check]]\nname = \"s/a\"\nkind = \"image\"\n";
        let e = parse(Path::new("t.toml"), text, &reference()).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (5, "layer[0].check[0].name"));
        assert!(e.to_string().contains("may not hold '/'"), "{e}");
    }

    #[test]
    fn errors_point_at_the_check() {
        let text = "[lane]\nname = \"t\"\n[[layer]]\nname = \"x\"\n[[layer.check]]\nname = \"a\"\nkind = \"tcp_open\"\ntargets = \"node99\"\nport = 1\n";
        let e = parse(Path::new("t.toml"), text, &reference()).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert_eq!(e.field, "layer[0].check[0].targets");
        assert!(e.message.contains("node99"), "{e}");

        let text = "[lane]\nname = \"t\"\n[[layer]]\nname = \"x\"\n[[layer.check]]\nname = \"a\"\nkind = \"warp\"\ntargets = \"all\"\n";
        let e = parse(Path::new("t.toml"), text, &reference()).unwrap_err();
        assert!(e.message.contains("warp"), "{e}");

        let text = "[lane]\nname = \"t\"\n[[layer]]\nname = \"x\"\n[[layer.check]]\nname = \"a\"\nkind = \"tcp_open\"\ntargets = \"all\"\nport = 1\nprot = 2\n";
        let e = parse(Path::new("t.toml"), text, &reference()).unwrap_err();
        assert!(e.message.contains("prot"), "{e}");

        let text = "[lane]\nname = \"t\"\n[[layer]]\nname = \"x\"\n[[layer.check]]\nname = \"a\"\nkind = \"tcp_open\"\ntargets = \"all\"\nport = 1\nartifact = \"../escape.json\"\n";
        let e = parse(Path::new("t.toml"), text, &reference()).unwrap_err();
        assert_eq!(e.field, "layer[0].check[0].artifact");
    }

    #[test]
    fn a_flaky_mark_needs_a_reason_and_a_sane_rerun_count() {
        let lane = |mark: &str| {
            format!(
                "[lane]\nname = \"t\"\n[[layer]]\nname = \"x\"\n[[layer.check]]\nname = \"a\"\n\
                 kind = \"tcp_open\"\ntargets = \"node01\"\nport = 1\n{mark}\n"
            )
        };
        let ok = parse(
            Path::new("t.toml"),
            &lane("flaky = { reason = \"issue 27\", reruns = 2 }"),
            &reference(),
        )
        .unwrap();
        let mark = ok.layers[0].checks[0].flaky.clone().unwrap();
        assert_eq!((mark.reason.as_str(), mark.reruns), ("issue 27", 2));
        for (bad, says) in [
            ("flaky = { reruns = 2 }", "reason"),
            ("flaky = { reason = \" \", reruns = 2 }", "reason"),
            ("flaky = { reason = \"r\", reruns = 0 }", "reruns = 0"),
            ("flaky = { reason = \"r\", reruns = 1000 }", "reruns = 1000"),
            ("flaky = { reason = \"r\", reruns = -1 }", "reruns"),
            ("flaky = true", "flaky ="),
            ("flaky = { reason = \"r\", reruns = 1, why = 2 }", "why"),
        ] {
            let e = parse(Path::new("t.toml"), &lane(bad), &reference()).unwrap_err();
            assert_eq!(e.line, 5, "{bad}: {e}");
            assert_eq!(e.field, "layer[0].check[0].flaky", "{bad}: {e}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }
}
