//! The Kubernetes-style hosting bundle (the k8shost part): a Deployment
//! manifest deployed on a worker by a runtime that reads Kubernetes YAML
//! (`podman kube play`), from container images built on the node from the
//! node's own files (no registry), then replaced by a new revision and
//! removed.
//!
//! The pod uses the node's network (`hostNetwork: true`): the image has no
//! iptables for CNI's port mapping, and a host-network pod is a plain
//! Kubernetes construct. Its service is reached from another node over the
//! fabric. The replacement is podman's `--replace` (the old pod goes, then
//! the new one starts: Kubernetes' Recreate strategy, not a rolling update
//! with overlap); the evidence records how long the service was away.

use super::procedure::Procedure;
use super::{Check, Ctx, Verdict};
use crate::guest::Guest;
use crate::spec::Cluster;
use crate::wait::{Pause, Probe, Wait};
use anyhow::{Result, bail};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `kube_bundle`: deploy, reach, replace and remove a Deployment on the
/// target node; its service is probed from `client`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeBundle {
    client: String,
    #[serde(default = "crate::spec::default::u16::<8088>")]
    port: u16,
}

/// Ports the reference nodes already serve (ssh, nginx, NBD, S3, exporter).
const TAKEN: &[u16] = &[22, 80, 8080, 9000, 9100, 10809];
const DIR: &str = "/run/photon-kube";
const APP: &str = "photon-web";

impl Check for KubeBundle {
    fn bind(&mut self, target: Option<&str>, cluster: &Cluster) -> Result<(), String> {
        let node = target.and_then(|t| cluster.node(t));
        if node.is_none_or(|n| n.role != crate::spec::Role::Worker) {
            return Err(format!(
                "{} is no worker: the bundle runs on worker nodes",
                target.unwrap_or("-")
            ));
        }
        if cluster.node(&self.client).is_none() || Some(self.client.as_str()) == target {
            return Err(format!(
                "client {:?} must be another node of the cluster",
                self.client
            ));
        }
        if TAKEN.contains(&self.port) || self.port < 1024 {
            return Err(format!(
                "port {} is privileged or served already",
                self.port
            ));
        }
        Ok(())
    }

    fn attempt(&self, ctx: &Ctx, target: Option<&str>, budget: Duration) -> Result<Verdict> {
        let node = ctx.node(target)?;
        let address = ctx.cluster.node(node).map(|n| n.address.to_string());
        let service = Service {
            client: ctx.guests.get(&self.client)?,
            url: format!("http://{}:{}/", address.unwrap_or_default(), self.port),
        };
        Ok(Procedure::new(ctx, node, budget)?.conclude(
            |run| lifecycle(run, &service, node, self.port),
            |run| {
                run.step(
                    "teardown",
                    "take the bundle down",
                    None,
                    &format!(
                        "podman kube down {DIR}/{APP}-v2.yaml; podman kube down {DIR}/{APP}-v1.yaml"
                    ),
                )
                .map(|_| ())
            },
            json!({ "node": node, "client": self.client }),
        ))
    }
}

/// The bundle's service, as its client node reaches it.
struct Service {
    client: Arc<Guest>,
    url: String,
}

impl Service {
    /// Asks the service from the client until `ok` holds for the answer
    /// (None: the port does not answer), by the procedure's deadline; the
    /// answer and the seconds taken.
    fn ask_until(
        &self,
        run: &Procedure,
        ok: impl Fn(Option<&str>) -> bool,
    ) -> Result<(Option<String>, f64)> {
        let started = Instant::now();
        let what = format!("{} from {}", self.url, self.client.endpoint.node);
        let answer = Wait::new(what, Duration::ZERO)
            .until(run.deadline())
            .pause(Pause::Every(Duration::from_millis(300)))
            .run(|| {
                let out = self.client.exec(
                    &format!("curl -sS -m 3 {}", self.url),
                    Duration::from_secs(10),
                )?;
                let answer = out.ok().then(|| out.stdout.trim().to_string());
                Ok(if ok(answer.as_deref()) {
                    Probe::Done(answer)
                } else {
                    Probe::Pending(format!(
                        "still {:?}",
                        answer.unwrap_or_else(|| out.stderr.trim().to_string())
                    ))
                })
            })?;
        Ok((answer, started.elapsed().as_secs_f64()))
    }
}

/// Deploy v1, reach it, replace it by v2 (a new pod), reach that, take it
/// down and prove nothing is left and the port is closed.
fn lifecycle(run: &mut Procedure, service: &Service, node: &str, port: u16) -> Result<String> {
    let pods = format!(
        "podman pod ps --filter name={APP} --format '{{{{.Name}}}} {{{{.Id}}}} {{{{.Status}}}}'"
    );
    run.must(
        "images-built",
        "build images v1 and v2",
        None,
        &build_images(port),
    )?;
    run.note("manifest_v1", json!(manifest("v1", port)));
    run.must(
        "play-v1",
        "kube play v1",
        None,
        &format!("podman kube play {DIR}/{APP}-v1.yaml"),
    )?;
    let v1 = run.must_stdout("pod-v1", "pod of v1", None, &pods)?;
    if !v1.contains("Running") {
        bail!("the pod is not running after kube play: {}", v1.trim());
    }
    let (answer, secs) = service.ask_until(run, |a| a.is_some_and(|a| a.contains("v1")))?;
    run.note("service_v1", json!({ "answer": answer, "seconds": secs }));

    // A new revision: the manifest names the v2 image.
    run.note("manifest_v2", json!(manifest("v2", port)));
    let started = Instant::now();
    run.must(
        "play-v2-replace",
        "kube play --replace v2",
        None,
        &format!("podman kube play --replace {DIR}/{APP}-v2.yaml"),
    )?;
    let (answer, _) = service.ask_until(run, |a| a.is_some_and(|a| a.contains("v2")))?;
    let replaced_s = started.elapsed().as_secs_f64();
    let v2 = run.must_stdout("pod-v2", "pod of v2", None, &pods)?;
    let id = |s: &str| s.split_whitespace().nth(1).map(str::to_string);
    if id(&v1) == id(&v2) || !v2.contains("Running") {
        bail!(
            "the replacement did not make a new running pod: {} -> {}",
            v1.trim(),
            v2.trim()
        );
    }
    run.note(
        "service_v2",
        json!({ "answer": answer, "seconds_since_replace": replaced_s }),
    );

    // Removal: no pod, no container, and the port is closed.
    run.must(
        "down",
        "kube down",
        None,
        &format!("podman kube down {DIR}/{APP}-v2.yaml"),
    )?;
    let left = run.must_stdout(
        "left-after-down",
        "pods and containers left after kube down",
        None,
        &format!("podman pod ps -q --filter name={APP}; podman ps -aq --filter label=app={APP}"),
    )?;
    if !left.trim().is_empty() {
        bail!(
            "left behind after kube down: {}",
            left.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    let (_, closed_s) = service.ask_until(run, |a| a.is_none())?;
    run.note("closed_after_s", json!(closed_s));
    Ok(format!(
        "Deployment {APP} ran on {node} and answered {} from {}; replaced by v2 in {replaced_s:.1} s \
         (Recreate: old pod down first); removed with nothing left",
        service.url, service.client.endpoint.node
    ))
}

/// Two images, v1 and v2, from the node's own busybox: a static web server
/// whose page names the revision and the node. No registry is involved.
fn build_images(port: u16) -> String {
    let mut s = format!("set -e; rm -rf {DIR}; mkdir -p {DIR}; ");
    for v in ["v1", "v2"] {
        s.push_str(&format!(
            "mkdir -p {DIR}/{v}/bin {DIR}/{v}/www; cp /bin/busybox {DIR}/{v}/bin/; \
             echo \"photon k8s {v} $(hostname)\" > {DIR}/{v}/www/index.html; \
             tar -C {DIR}/{v} -c . | podman import -q --change 'CMD [\"/bin/busybox\",\"httpd\",\"-f\",\"-h\",\"/www\"]' - localhost/{APP}:{v}; \
             printf '%s' '{m}' > {DIR}/{APP}-{v}.yaml; ",
            m = manifest(v, port)
        ));
    }
    s.push_str(&format!("podman images --filter reference=localhost/{APP}"));
    s
}

/// The Deployment, as a user would write it.
fn manifest(revision: &str, port: u16) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {APP}
  labels:
    app: {APP}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: {APP}
  template:
    metadata:
      labels:
        app: {APP}
        revision: {revision}
    spec:
      hostNetwork: true
      containers:
      - name: web
        image: localhost/{APP}:{revision}
        command: [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"{port}\", \"-h\", \"/www\"]
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_on_workers_only_with_another_client() {
        let cluster = Cluster::profile("reference").unwrap();
        let parse = |s: &str| -> KubeBundle { toml::from_str(s).unwrap() };
        parse("client = \"node05\"")
            .bind(Some("node04"), &cluster)
            .unwrap();
        let e = parse("client = \"node05\"")
            .bind(Some("node01"), &cluster)
            .unwrap_err();
        assert!(e.contains("node01 is no worker"), "{e}");
        let e = parse("client = \"node04\"")
            .bind(Some("node04"), &cluster)
            .unwrap_err();
        assert!(e.contains("another node"), "{e}");
        let e = parse("client = \"node05\"\nport = 8080")
            .bind(Some("node04"), &cluster)
            .unwrap_err();
        assert!(e.contains("served already"), "{e}");
    }

    #[test]
    fn the_manifest_is_a_deployment_of_the_local_image() {
        let m = manifest("v2", 8088);
        assert!(m.contains("kind: Deployment"));
        assert!(m.contains("image: localhost/photon-web:v2"));
        assert!(m.contains("\"-p\", \"8088\""));
        assert!(!m.contains('\''), "the manifest is passed in single quotes");
    }
}
