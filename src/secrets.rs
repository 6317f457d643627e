//! The cluster's secrets, and their redaction from everything the
//! artifacts keep. The secrets are the IAM secret (the gateway's basic-auth
//! password), the S3 secret key (the storage nodes' S3 servers), the
//! cluster's SSH client key, and each node's SSH host key.
//! Consoles, journals, check evidence, result.json, junit.xml and
//! report.md pass through [`Secrets::redact`] on their way into the
//! artifacts, so a secret a service happens to log never leaves the state
//! directory (which is private: 0700).

use crate::state::StateDir;
use std::borrow::Cow;
use std::fs;
use std::path::Path;

/// What replaces a secret in the artifacts.
pub const REDACTED: &str = "[redacted]";

/// The strings that must not appear in the artifacts.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    needles: Vec<String>,
}

impl Secrets {
    /// The secrets of the cluster in `state`. Missing files are skipped: a
    /// state directory without a cluster has nothing to hide.
    pub fn load(state: &StateDir) -> Secrets {
        let mut s = Secrets::default();
        let ssh = state.ssh();
        for file in [
            "iam-secret",
            "s3-secret",
            crate::provision::dns::TSIG_SECRET_FILE,
        ] {
            if let Ok(secret) = fs::read_to_string(ssh.join(file)) {
                s.add(secret.trim());
            }
        }
        s.add_private_key(ssh.join("id_ed25519").as_std_path());
        for dir in state.node_dirs() {
            s.add_private_key(&dir.join("config").join("ssh_host_ed25519_key"));
        }
        s
    }

    /// Adds one secret string (short ones are ignored: they would redact
    /// ordinary words).
    pub fn add(&mut self, secret: &str) {
        if secret.len() >= 12 && !self.needles.iter().any(|n| n == secret) {
            self.needles.push(secret.to_string());
        }
    }

    /// Adds each base64 line of an OpenSSH private key: any one of them
    /// in an artifact means the key leaked.
    fn add_private_key(&mut self, path: &Path) {
        let Ok(text) = fs::read_to_string(path) else {
            return;
        };
        for line in text.lines().filter(|l| !l.starts_with("-----")) {
            self.add(line.trim());
        }
    }

    /// The secrets, for tests that scan artifacts.
    pub fn needles(&self) -> &[String] {
        &self.needles
    }

    /// `text` with every secret replaced by [`REDACTED`].
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = Cow::Owned(out.replace(n.as_str(), REDACTED));
            }
        }
        out
    }

    /// Bytes with every secret replaced, when they are text; binary data
    /// (a pcap) is returned as it is.
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        match std::str::from_utf8(bytes) {
            Ok(text) => match self.redact(text) {
                Cow::Borrowed(_) => Cow::Borrowed(bytes),
                Cow::Owned(s) => Cow::Owned(s.into_bytes()),
            },
            Err(_) => Cow::Borrowed(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_secret_of_the_state_is_redacted_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().to_path_buf()).unwrap();
        fs::create_dir_all(state.ssh()).unwrap();
        fs::write(state.ssh().join("iam-secret"), "0123456789abcdef0123\n").unwrap();
        fs::write(state.ssh().join("s3-secret"), "fedcba9876543210fedc\n").unwrap();
        crate::provision::keygen(state.ssh().join("id_ed25519").as_std_path(), "t").unwrap();
        let host = state.create_node("node01").unwrap().join("config");
        fs::create_dir_all(&host).unwrap();
        crate::provision::keygen(host.join("ssh_host_ed25519_key").as_std_path(), "h").unwrap();
        let s = Secrets::load(&state);
        let key = fs::read_to_string(state.ssh().join("id_ed25519")).unwrap();
        let host_key = fs::read_to_string(host.join("ssh_host_ed25519_key")).unwrap();
        let leaky = format!(
            "login with 0123456789abcdef0123 ok\ns3 fedcba9876543210fedc\n{key}\nhost:\n{host_key}\nplain words stay"
        );
        let clean = s.redact(&leaky);
        assert!(!clean.contains("0123456789abcdef0123"), "{clean}");
        assert!(!clean.contains("fedcba9876543210fedc"), "{clean}");
        for line in key.lines().chain(host_key.lines()) {
            if !line.starts_with("-----") && line.len() >= 12 {
                assert!(!clean.contains(line), "{line} kept in {clean}");
            }
        }
        assert!(clean.contains("login with [redacted] ok"));
        assert!(clean.contains("plain words stay"));
        // Text without a secret is not copied.
        assert!(matches!(s.redact("nothing here"), Cow::Borrowed(_)));
        assert!(matches!(s.redact_bytes(&[0xff, 0x00]), Cow::Borrowed(_)));
    }
}
