//! `[p2prc]` in `node.toml`: P2PRC compatibility, off without the section.
//!
//! ```toml
//! [p2prc]
//! listen = "0.0.0.0:8088"            # P2PRC's node API, plain HTTP (off without it)
//! add_proxy = false                  # the root answers /AddProxy for known P2PRC peers
//! gossip_interval = "60s"            # between table exchanges with known P2PRC peers
//! ssh_user = "alice"                 # whose authorized_keys get the members' keys (default: the agent's user)
//! authorized_keys = "/home/alice/.ssh/authorized_keys"  # default: that user's
//! ssh_public_key = "/home/alice/.ssh/id_ed25519.pub"    # default: one made for the node in DATA/ssh
//! ssh_port = 22                      # BareMetalSSHPort in the node's P2PRC entry
//! ```
//!
//! Unsafe mode itself is the node's top-level `unsafe_mode` (P2PRC's `UnsafeMode`, on by
//! default): with a `[p2prc]` section and unsafe mode on, the node keeps every authenticated
//! member's key in `authorized_keys` (see `ssh_keys`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[p2prc]`: see the module's documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2prcSettings {
    /// Where P2PRC's node API answers (plain HTTP); none without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Whether the root answers `/AddProxy` (default false).
    #[serde(default)]
    pub add_proxy: bool,
    /// Time between table exchanges with known P2PRC peers (default 60s, at least 1s).
    #[serde(
        default = "default_gossip_interval",
        with = "p2f_model::duration::serde_str"
    )]
    pub gossip_interval: Duration,
    /// The OS user whose `authorized_keys` holds the members' keys, and the node's
    /// `MachineUsername` (default: the user the agent runs as).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<String>,
    /// The `authorized_keys` file (default: `~SSH_USER/.ssh/authorized_keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_keys: Option<PathBuf>,
    /// The node's SSH public key (an OpenSSH `.pub` file); default: an Ed25519 key made for
    /// the node in `DATA/ssh/id_ed25519`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<PathBuf>,
    /// `BareMetalSSHPort` in the node's P2PRC entry (default 22).
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
}

fn default_gossip_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_ssh_port() -> u16 {
    22
}

impl Default for P2prcSettings {
    fn default() -> Self {
        P2prcSettings {
            listen: None,
            add_proxy: false,
            gossip_interval: default_gossip_interval(),
            ssh_user: None,
            authorized_keys: None,
            ssh_public_key: None,
            ssh_port: default_ssh_port(),
        }
    }
}

impl P2prcSettings {
    /// Makes the paths absolute with `resolve` (relative ones are taken from the config
    /// file's directory).
    pub fn resolve_paths(&mut self, resolve: impl Fn(&std::path::Path) -> PathBuf) {
        self.authorized_keys = self.authorized_keys.as_deref().map(&resolve);
        self.ssh_public_key = self.ssh_public_key.as_deref().map(&resolve);
    }

    /// Settings the node can live with; the error names the setting.
    pub fn check(&self) -> Result<(), String> {
        if self.gossip_interval < Duration::from_secs(1) {
            return Err(format!(
                "p2prc.gossip_interval = \"{}\" is too short: at least 1s",
                p2f_model::format_duration(self.gossip_interval)
            ));
        }
        if self.ssh_port == 0 {
            return Err("p2prc.ssh_port must be 1-65535".into());
        }
        if let Some(user) = &self.ssh_user
            && (user.is_empty()
                || !user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
        {
            return Err(format!("p2prc.ssh_user = {user:?} is not a user name"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<P2prcSettings, String> {
        let settings: P2prcSettings = toml::from_str(text).map_err(|e| e.to_string())?;
        settings.check()?;
        Ok(settings)
    }

    #[test]
    fn defaults_round_trip_and_mistakes_are_named() {
        let empty = parse("").expect("empty");
        assert_eq!(empty, P2prcSettings::default());
        assert_eq!(
            (empty.listen, empty.add_proxy, empty.ssh_port),
            (None, false, 22)
        );
        let full = parse(
            "listen = \"127.0.0.1:8088\"\nadd_proxy = true\nssh_user = \"kim\"\nssh_port = 2222\n\
             authorized_keys = \"/tmp/k\"\nssh_public_key = \"/tmp/k.pub\"\ngossip_interval = \"5s\"\n",
        )
        .expect("full");
        assert_eq!(parse(&toml::to_string(&full).expect("toml")), Ok(full));
        for (text, want) in [
            ("listen = \"nope\"", "invalid socket address"),
            ("unsafe = true", "unknown field `unsafe`"),
            (
                "gossip_interval = \"10ms\"",
                "p2prc.gossip_interval = \"10ms\" is too short",
            ),
            ("ssh_port = 0", "p2prc.ssh_port"),
            (
                "ssh_user = \"a b\"",
                "p2prc.ssh_user = \"a b\" is not a user name",
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
