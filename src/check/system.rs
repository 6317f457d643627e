//! Checks on the node itself: its image, its systemd units, a command, a
//! TCP connect made from inside it.

use super::{Ctx, Verdict, shell_quote, tail};
use crate::guest::Guest;
use anyhow::Result;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The cluster runs the image the current recipe builds, and its files exist.
pub fn image(ctx: &Ctx) -> Result<Verdict> {
    let running = &ctx.record.image;
    let mut files = BTreeMap::new();
    let mut missing = Vec::new();
    for (_, p) in running.files() {
        match std::fs::metadata(&p) {
            Ok(m) => {
                files.insert(p.display().to_string(), m.len());
            }
            Err(_) => missing.push(p.display().to_string()),
        }
    }
    let current = crate::image::resolve(ctx.cluster, ctx.state).ok();
    let evidence = json!({
        "provider": running.provider,
        "id": running.id,
        "files": files,
        "current_recipe_id": current.as_ref().map(|c| c.id.clone()),
    });
    if !missing.is_empty() {
        return Ok(Verdict::fail(
            format!("image files missing: {}", missing.join(", ")),
            evidence,
        ));
    }
    match current {
        Some(c) if c.id != running.id => Ok(Verdict::fail(
            format!(
                "the cluster runs image {} but the recipe now builds {}; restart it",
                running.id, c.id
            ),
            evidence,
        )),
        _ => Ok(Verdict::pass(
            format!("{} image {}", running.provider, running.id),
            evidence,
        )),
    }
}

/// Every unit in `units` (default: the node's expected units) is active.
pub fn units(
    ctx: &Ctx,
    guest: &Guest,
    node: &str,
    units: &[String],
    budget: Duration,
) -> Result<Verdict> {
    let units: Vec<String> = if units.is_empty() {
        ctx.record
            .nodes
            .get(node)
            .map(|n| n.units.clone())
            .unwrap_or_default()
    } else {
        units.to_vec()
    };
    let states: BTreeMap<String, String> = crate::guest::unit_states(guest, &units)?
        .into_iter()
        .collect();
    let bad: Vec<String> = states
        .iter()
        .filter(|(_, s)| *s != "active")
        .map(|(u, s)| format!("{u} is {s}"))
        .collect();
    let mut evidence = json!({ "units": states });
    if bad.is_empty() {
        return Ok(Verdict::pass(
            format!("{} units active", states.len()),
            evidence,
        ));
    }
    let first = states
        .iter()
        .find(|(_, s)| *s != "active")
        .map(|(u, _)| u.clone())
        .unwrap_or_default();
    let journal = guest
        .exec(
            &format!(
                "journalctl -b -u {} -n 15 --no-pager -o short-precise",
                shell_quote(&first)
            ),
            budget,
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
    evidence["journal_tail"] = json!(journal);
    Ok(Verdict::fail(bad.join(", "), evidence))
}

pub fn exec(
    guest: &Guest,
    command: &str,
    exit: i32,
    contains: Option<&str>,
    equals: Option<&str>,
    budget: Duration,
) -> Result<Verdict> {
    let out = guest.exec(command, budget)?;
    let evidence = json!({
        "command": command,
        "exit": out.code,
        "stdout": tail(&out.stdout, 40),
        "stderr": tail(&out.stderr, 20),
    });
    let stdout = out.stdout.trim();
    if out.code != exit {
        return Ok(Verdict::fail(
            format!("exited {} (expected {exit})", out.code),
            evidence,
        ));
    }
    if let Some(want) = contains
        && !stdout.contains(want)
    {
        return Ok(Verdict::fail(format!("stdout lacks {want:?}"), evidence));
    }
    if let Some(want) = equals
        && stdout != want
    {
        return Ok(Verdict::fail(
            format!("stdout is {stdout:?}, expected {want:?}"),
            evidence,
        ));
    }
    Ok(Verdict::pass(format!("exit {}", out.code), evidence))
}

pub fn tcp_open(guest: &Guest, host: &str, port: u16, budget: Duration) -> Result<Verdict> {
    let evidence = json!({ "from": guest.endpoint.node, "host": host, "port": port });
    Ok(match guest.tcp_connect(host, port, budget) {
        Ok(()) => Verdict::pass(format!("{host}:{port} accepts connections"), evidence),
        Err(e) => Verdict::fail(format!("{host}:{port}: {e:#}"), evidence),
    })
}
