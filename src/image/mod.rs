//! Image providers: where a cluster's kernel, initrd and root image come from.
//!
//! - `debian`: built here from Debian packages by `photon-cluster build`,
//!   cached under the state directory by a hash of the recipe.
//! - `prebuilt`: paths given in the cluster file, or an image directory
//!   with per-node subdirectories (`dir`).
//! - `nix`: one image per node, built by `nix build` from a flake attribute.

pub mod debian;
pub mod dir;
pub mod nix;

use crate::error::bad_input;
use crate::spec::{Cluster, ImageSource};
use crate::state::{ImageRecord, StateDir};
use anyhow::Result;

/// Finds the cluster's images without building anything; a missing image is
/// bad input (exit 2) with a hint on how to build it.
pub fn resolve(cluster: &Cluster, state: &StateDir) -> Result<ImageRecord> {
    match cluster.image.clone() {
        ImageSource::Debian { suite } => {
            let recipe = debian::Recipe::new(&suite);
            recipe.find(state.images().as_std_path()).ok_or_else(|| {
                crate::error::named(
                    crate::error::ErrorKind::ImageMissing,
                    bad_input(format!(
                        "missing image: the {suite} image for recipe {} is not built in {}; \
                     run `photon-cluster build` first",
                        recipe.hash(),
                        state.images()
                    )),
                )
            })
        }
        ImageSource::Prebuilt {
            kernel,
            initrd,
            rootfs,
        } => Ok(ImageRecord {
            provider: "prebuilt".into(),
            id: rootfs.display().to_string(),
            kernel,
            initrd,
            rootfs,
            nodes: Default::default(),
        }),
        ImageSource::PrebuiltDir { dir } => dir::scan(&dir, cluster.node_names()),
        ImageSource::Nix { flake, attribute } => nix::find(cluster, state, &flake, &attribute),
    }
}

/// Builds the cluster's images if its provider builds any; returns them.
pub fn build(cluster: &Cluster, state: &StateDir) -> Result<ImageRecord> {
    match cluster.image.clone() {
        ImageSource::Debian { suite } => {
            debian::Recipe::new(&suite).build(state.images().as_std_path())
        }
        ImageSource::Prebuilt { .. } | ImageSource::PrebuiltDir { .. } => resolve(cluster, state),
        ImageSource::Nix { flake, attribute } => nix::build(cluster, state, &flake, &attribute),
    }
}
