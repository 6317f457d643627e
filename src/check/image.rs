//! `image`: the cluster runs the image the current recipe builds, and its
//! files still exist. Runs once, without a target.

use super::{Check, Ctx, Verdict};
use anyhow::Result;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {}

impl Check for Image {
    fn attempt(&self, ctx: &Ctx, _target: Option<&str>, _budget: Duration) -> Result<Verdict> {
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
        let evidence = json!({
            "provider": running.provider,
            "id": running.id,
            "files": files,
            "current_recipe_id": ctx.current_image,
        });
        if !missing.is_empty() {
            return Ok(Verdict::fail(
                format!("image files missing: {}", missing.join(", ")),
                evidence,
            ));
        }
        match ctx.current_image {
            Some(current) if current != running.id => Ok(Verdict::fail(
                format!(
                    "the cluster runs image {} but the recipe now builds {current}; restart it",
                    running.id
                ),
                evidence,
            )),
            _ => Ok(Verdict::pass(
                format!("{} image {}", running.provider, running.id),
                evidence,
            )),
        }
    }
}
