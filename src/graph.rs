//! `run --jobs N`: a lane's graph of layers outside Nix. The steps a Nix
//! build of `mkLayeredCheck` takes (nix/lib/layers.nix), as processes of
//! this driver: the ready cluster once (`run --ready`), then each layer in
//! a restore of its own (`run --from-ready DIR --layer NAME`), N at a time,
//! a layer with `after` from that layer's end state (`--save-end`), and the
//! lane assembled from their outputs (`run --assemble`, in-process). Each
//! process has its own state directory and host ports, as Nix builds with
//! the sandbox off do, so a layer that breaks a node changes no sibling.

use crate::lane::Lane;
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Context, Result, bail};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `run`'s arguments this command sets itself for each process it starts
/// (with a value, then without). `--timeout`: each gets what is left of
/// this one's, so that it ends with `timeout` when this one does.
const OWN_VALUES: &[&str] = &["--jobs", "--out", "--state-dir", "--timeout"];
const OWN_FLAGS: &[&str] = &["--keep-failed", "--json"];

/// No layer is waited for longer; each process keeps its own deadlines
/// (`--timeout` included), this only bounds the scheduler.
const LAYERS_AT_MOST: Duration = Duration::from_secs(24 * 3600);
/// How long a layer stopped by Ctrl-C may take to tear down.
const TEARDOWN: Duration = Duration::from_secs(120);

/// A layer's process: its name, where its output goes, its log.
struct Job {
    name: String,
    out: PathBuf,
    log: PathBuf,
    child: Child,
    started: Instant,
}

/// Runs the lane as its graph: ready, layers `jobs` at a time, assembly in
/// `out`. The step processes' outputs and logs go to `<out>.parts/`; the
/// logs are kept in `out/jobs/`, the rest is removed after the assembly.
/// Returns the exit code, as `run` does.
pub fn run(lane: &Lane, out: &Path, jobs: usize, keep_failed: bool, json: bool) -> Result<u8> {
    let parts = parts_dir(out);
    let _ = fs::remove_dir_all(&parts);
    fs::create_dir_all(parts.join("logs"))
        .with_context(|| format!("creating {}", parts.display()))?;
    let base = base_args(std::env::args_os());
    let ready = parts.join("ready");
    eprintln!("graph: the ready cluster, once, into {}", ready.display());
    let mut boot = step(&base, &parts, "ready", &ready, &["--ready".into()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting the ready boot")?;
    own(&boot);
    let status = boot.wait();
    crate::disown_child(boot.id());
    let status = status.context("waiting for the ready boot")?;
    if crate::stopped_as().is_some() {
        keep_logs(&parts, out);
        return Err(crate::stop_error().context("during the ready boot; nothing of the lane ran"));
    }
    if !status.success() {
        bail!("the ready boot ended {status}; nothing of the lane ran");
    }
    let outputs = match layers(lane, &base, &parts, &ready, jobs.max(1)) {
        Ok(outputs) => outputs,
        Err(e) if crate::stopped_as().is_some() => return stopped(lane, &parts, out, json, e),
        Err(e) => return Err(e),
    };
    let code = crate::layered::assemble(&outputs, out, keep_failed, json, None)?;
    keep_logs(&parts, out);
    let _ = fs::remove_dir_all(&parts);
    Ok(code)
}

/// Ctrl-C or `--timeout` stopped the layers: what they left is assembled
/// (each stopped one says so itself), the lane's status says how it
/// stopped, and the parts stay beside the output; the stop is the error.
fn stopped(lane: &Lane, parts: &Path, out: &Path, json: bool, e: anyhow::Error) -> Result<u8> {
    let left: Vec<PathBuf> = lane
        .layers
        .iter()
        .map(|l| parts.join(&l.name))
        .filter(|d| d.join("result.json").is_file())
        .collect();
    if !left.is_empty() {
        crate::layered::assemble(&left, out, false, json, crate::stopped_as())?;
    }
    keep_logs(parts, out);
    Err(e)
}

/// Where the step processes' outputs go: beside `out`, not in it.
fn parts_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    out.with_file_name(name)
}

/// This process's command line without the program and the arguments each
/// step sets itself (`--jobs`, `--out`, `--state-dir`, `--keep-failed`,
/// `--json`, with their values).
pub fn base_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut skip_value = false;
    for a in args.into_iter().skip(1) {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let s = a.to_string_lossy();
        let name = s.split('=').next().unwrap_or_default();
        if OWN_FLAGS.contains(&name) {
            continue;
        }
        if OWN_VALUES.contains(&name) {
            skip_value = !s.contains('=');
            continue;
        }
        kept.push(a);
    }
    kept
}

/// One step's process: this driver with `base`, its own state directory
/// and output, `--keep-failed` (a failed step is an output too), `extra`.
fn step(base: &[OsString], parts: &Path, name: &str, out: &Path, extra: &[OsString]) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| "photon-cluster".into());
    let mut c = Command::new(exe);
    // A group of its own: the terminal's Ctrl-C reaches this process only,
    // which passes each one on (a second one at once would end the step
    // without its evidence).
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    // Rounded up: the step's timeout fires with or just after this one's,
    // so this one knows it stopped when the step ends.
    if let Some(left) = crate::time_left() {
        let secs = left.as_millis().div_ceil(1000).max(1);
        c.arg("--timeout").arg(secs.to_string());
    }
    c.args(base)
        .args(extra)
        .arg("--keep-failed")
        .arg("--out")
        .arg(out)
        .arg("--state-dir")
        .arg(parts.join(format!("state-{name}")));
    c
}

/// Runs every layer, at most `jobs` at once, each as soon as what it
/// starts from is there; their output directories, in the lane's order.
fn layers(
    lane: &Lane,
    base: &[OsString],
    parts: &Path,
    ready: &Path,
    jobs: usize,
) -> Result<Vec<PathBuf>> {
    let ends: Vec<&str> = lane
        .layers
        .iter()
        .filter_map(|l| l.after.as_deref())
        .collect();
    let mut waiting: Vec<&crate::lane::Layer> = lane.layers.iter().collect();
    let mut running: Vec<Job> = Vec::new();
    let mut finished: Vec<String> = Vec::new();
    let total = waiting.len();
    let result = Wait::new("the lane's layers", LAYERS_AT_MOST)
        .pause(Pause::Every(Duration::from_millis(200)))
        .run(|| {
            finished.extend(reap(&mut running)?);
            while running.len() < jobs {
                let Some(i) = waiting.iter().position(|l| match &l.after {
                    Some(a) => finished.contains(a),
                    None => true,
                }) else {
                    break;
                };
                let layer = waiting.remove(i);
                let from = match &layer.after {
                    Some(a) => parts.join(a).join("end"),
                    None => ready.to_path_buf(),
                };
                let save_end = ends.contains(&layer.name.as_str());
                running.push(launch(base, parts, &layer.name, &from, save_end)?);
            }
            Ok(if running.is_empty() && waiting.is_empty() {
                Probe::Done(())
            } else {
                Probe::Pending(format!("{} of {total} layers done", finished.len()))
            })
        });
    if let Err(e) = result {
        stop_all(&mut running);
        return Err(e);
    }
    Ok(lane.layers.iter().map(|l| parts.join(&l.name)).collect())
}

/// Records a step's process, so that each Ctrl-C is passed on to it; one
/// that came while it was starting is passed on now.
fn own(child: &Child) {
    crate::own_child(child.id());
    if crate::interrupted() && crate::timed_out().is_none() {
        crate::interrupt_child(child.id());
    }
}

/// Starts one layer's process, its stdout and stderr into its log.
fn launch(base: &[OsString], parts: &Path, name: &str, from: &Path, save_end: bool) -> Result<Job> {
    let (out, log) = (
        parts.join(name),
        parts.join("logs").join(format!("{name}.log")),
    );
    let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut extra: Vec<OsString> = vec![
        "--from-ready".into(),
        from.into(),
        "--layer".into(),
        name.into(),
    ];
    if save_end {
        extra.push("--save-end".into());
    }
    let child = step(base, parts, name, &out, &extra)
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting layer {name}"))?;
    own(&child);
    eprintln!("graph: layer {name} started (log: {})", log.display());
    Ok(Job {
        name: name.to_string(),
        out,
        log,
        child,
        started: Instant::now(),
    })
}

/// The layers whose process ended, taken out of `running`. A layer that
/// left no output (it could not even start) ends the run with its log.
fn reap(running: &mut Vec<Job>) -> Result<Vec<String>> {
    let mut ended = Vec::new();
    let mut i = 0;
    while i < running.len() {
        let Some(status) = running[i].child.try_wait()? else {
            i += 1;
            continue;
        };
        let job = running.remove(i);
        crate::disown_child(job.child.id());
        report(&job, status)?;
        ended.push(job.name);
    }
    Ok(ended)
}

/// One line per finished layer; a layer without a result.json is an error.
fn report(job: &Job, status: ExitStatus) -> Result<()> {
    let secs = job.started.elapsed().as_secs_f64();
    let result = job.out.join("result.json");
    let outcome = fs::read(&result)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["status"].as_str().map(str::to_string));
    let Some(outcome) = outcome else {
        bail!(
            "layer {} ended {status} without a result.json; its log: {}",
            job.name,
            job.log.display()
        );
    };
    eprintln!("graph: layer {} {outcome} in {secs:.1} s", job.name);
    Ok(())
}

/// The layers stop: each is waited for through its teardown, then killed.
/// Ctrl-C was passed on to them as it came, and `--timeout` is their own
/// (at most a second after this one's); any other end asks them to stop
/// as Ctrl-C would.
fn stop_all(running: &mut Vec<Job>) {
    if !crate::interrupted() {
        for job in running.iter() {
            crate::interrupt_child(job.child.id());
        }
    }
    let _ = Wait::new("layers stopping", TEARDOWN)
        .through_interrupt()
        .pause(Pause::Every(Duration::from_millis(200)))
        .run(|| {
            running.retain_mut(|j| matches!(j.child.try_wait(), Ok(None)));
            Ok(if running.is_empty() {
                Probe::Done(())
            } else {
                Probe::Pending(format!("{} layers still stopping", running.len()))
            })
        });
    for job in running.iter_mut() {
        let _ = job.child.kill();
        let _ = job.child.wait();
        crate::disown_child(job.child.id());
    }
}

/// The step processes' logs, kept with the lane's artifacts.
fn keep_logs(parts: &Path, out: &Path) {
    let to = out.join("jobs");
    let _ = fs::create_dir_all(&to);
    for e in fs::read_dir(parts.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::copy(e.path(), to.join(e.file_name()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_sets_its_own_out_state_and_flags() {
        let args = [
            "photon-cluster",
            "--state-dir",
            "/s",
            "run",
            "--out=/o",
            "--jobs",
            "2",
            "--lane-file",
            "l.toml",
            "--json",
            "--keep-failed",
            "--timeout",
            "30",
            "--image-dir",
            "/i",
        ];
        let kept = base_args(args.iter().map(OsString::from));
        assert_eq!(kept, ["run", "--lane-file", "l.toml", "--image-dir", "/i"]);
    }

    #[test]
    fn the_parts_go_beside_the_output() {
        assert_eq!(parts_dir(Path::new("/a/lane")), Path::new("/a/lane.parts"));
    }
}
