//! The agent's configuration: a TOML file, every field defaulted but the node's name.
//!
//! ```toml
//! name = "laptop"                  # the node's stable name (P2PRC `Name`)
//! listen = "127.0.0.1:7440"        # the control API (HTTPS); port 0 picks a free one
//! data_dir = "/var/lib/p2f"        # records, bundles, logs
//! cluster_dir = "/etc/p2f/cluster" # ca.pem, secret (and ca.key on the root); default DATA_DIR/cluster
//! bare_metal = true                # P2PRC's BareMetal
//! unsafe_mode = true               # P2PRC's UnsafeMode
//!
//! [supervisor]
//! health_interval = "5s"           # between health checks; 3 failures in a row fail the process
//! memory_interval = "5s"           # between RSS refreshes
//! log_max_bytes = 10485760         # a log file is rotated past this size
//! log_keep = 3                     # rotated files kept
//! containment = "cgroup"           # a cgroup v2 per process (else "tree": the relay's tree)
//! pass_env = ["HTTP_PROXY"]        # agent variables its processes get (besides PATH, locale...)
//! deploy_timeout = "30m"           # the longest a deploy step may take
//! nix_options = { substituters = "" }  # `nix build --option NAME VALUE` pairs
//!
//! [mesh]                           # gossip with other nodes (written by `p2f init` / `join`)
//! listen = "127.0.0.1:7441"        # UDP
//! seeds = ["192.168.1.10:7441"]    # the root's gossip address
//! gossip_interval = "250ms"        # between gossip rounds
//! phi_threshold = 16.0             # silence that makes a node lost: ~2.5-3.5 s by default
//!
//! [ingress]                        # the root's front door (written by `p2f init`; root only)
//! enabled = true
//! http = "0.0.0.0:80"              # plain HTTP: redirects to HTTPS (but ACME's challenges)
//! https = "0.0.0.0:443"            # HTTPS, HTTP/1.1 and HTTP/2, a certificate per domain
//! hold = "5s"                      # how long an idempotent request waits for a new copy
//! redirect = true                  # HTTP → HTTPS (308); false serves plain HTTP too
//! acme_email = "me@example.org"    # certificates for public names from ACME (off without it)
//! acme_directory = "https://acme-v02.api.letsencrypt.org/directory"  # the default
//! acme_ca = "/etc/p2f/acme-ca.pem" # a CA to trust for the directory (default: the system's)
//! acme_challenge = "auto"          # or "http-01", "tls-alpn-01"; auto: TLS-ALPN-01, then HTTP-01
//! workers = 2                      # threads serving connections (default one per CPU; 0: shared)
//!
//! [relay]                          # members behind NAT (see relay/link.rs)
//! via_root = "auto"                # true: always keep a link to the root; false: never;
//!                                  # auto: when the root cannot reach this node's API
//!
//! [p2prc]                          # P2PRC compatibility and the SSH key mesh (p2prc/config.rs)
//! listen = "0.0.0.0:8088"          # P2PRC's node API, plain HTTP (off without it)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p2f_model::NodeName;
use serde::{Deserialize, Serialize};

/// The default API port.
pub const DEFAULT_PORT: u16 = 7440;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// How the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node's name.
    pub name: NodeName,
    /// Where the control API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The address other nodes and clients reach this node at (host only); default: the
    /// listen address's IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Records, bundles and logs.
    pub data_dir: PathBuf,
    /// The root's API address, on members (written by `p2f node join`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// The cluster's trust files; default `DATA_DIR/cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_dir: Option<PathBuf>,
    /// P2PRC's `BareMetal`.
    #[serde(default = "yes")]
    pub bare_metal: bool,
    /// P2PRC's `UnsafeMode`.
    #[serde(default = "yes")]
    pub unsafe_mode: bool,
    /// Supervisor settings.
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    /// Gossip with the other nodes; without it the node is alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshSettings>,
    /// The root's ingress (each service's `domain` over HTTP and HTTPS); ignored on other
    /// nodes. Without the section there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSettings>,
    /// How a member behind NAT is reached (its link to the root).
    #[serde(default, skip_serializing_if = "RelaySettings::is_default")]
    pub relay: RelaySettings,
    /// P2PRC compatibility (its node API, known P2PRC peers, the SSH key mesh); none without
    /// the section. See `crate::p2prc::config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2prc: Option<crate::p2prc::P2prcSettings>,
}

/// `[relay]`: whether a member keeps a link to the root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// `true`, `false` or `"auto"` (the default: link when the root cannot reach this node).
    #[serde(default, with = "via_root")]
    pub via_root: crate::relay::link::ViaRoot,
}

impl RelaySettings {
    fn is_default(&self) -> bool {
        *self == RelaySettings::default()
    }
}

/// `via_root`: a boolean or `"auto"`.
mod via_root {
    use crate::relay::link::ViaRoot;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &ViaRoot, s: S) -> Result<S::Ok, S::Error> {
        match v {
            ViaRoot::Auto => s.serialize_str("auto"),
            ViaRoot::Always => s.serialize_bool(true),
            ViaRoot::Never => s.serialize_bool(false),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Bool(bool),
        Text(String),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ViaRoot, D::Error> {
        match Given::deserialize(d)? {
            Given::Bool(true) => Ok(ViaRoot::Always),
            Given::Bool(false) => Ok(ViaRoot::Never),
            Given::Text(text) if text == "auto" => Ok(ViaRoot::Auto),
            Given::Text(text) => Err(serde::de::Error::custom(format!(
                "relay.via_root = {text:?}: use true, false or \"auto\""
            ))),
        }
    }
}

/// Where the root serves each service's `domain`, and how long a request waits for a copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressSettings {
    /// Whether the ingress runs (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Plain HTTP (default `0.0.0.0:80`); port 0 picks a free one.
    #[serde(default = "default_ingress_http")]
    pub http: SocketAddr,
    /// HTTPS (default `0.0.0.0:443`); port 0 picks a free one.
    #[serde(default = "default_ingress_https")]
    pub https: SocketAddr,
    /// How long a request with an idempotent method waits for a copy of its process to serve
    /// it (a failover, a move, a restart) before it is answered 503 (default 5s, at most 60s).
    #[serde(default = "default_hold", with = "p2f_model::duration::serde_str")]
    pub hold: Duration,
    /// Whether plain HTTP redirects to HTTPS (308; default true). ACME's challenge path is
    /// never redirected.
    #[serde(default = "yes")]
    pub redirect: bool,
    /// The ACME account's contact address. Setting it turns ACME on: public names (all but
    /// `.home.arpa`, `.internal`, `.lan`, `.local`, `.test`, `localhost`, IP literals) get
    /// certificates from `acme_directory`. Without it they get none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_email: Option<String>,
    /// The ACME directory (an `https://` URL); default Let's Encrypt's production one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_directory: Option<String>,
    /// A PEM file whose first certificate is trusted for the directory's TLS (a test CA, a
    /// private CA); default: the system's roots. Relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_ca: Option<PathBuf>,
    /// Which ACME challenge proves control of a name: `auto` (default: TLS-ALPN-01 on the
    /// HTTPS port, and when that fails HTTP-01 on the HTTP port), `http-01` or `tls-alpn-01`.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub acme_challenge: crate::ingress::acme::AcmeChallenge,
    /// Threads that serve the ingress's connections, each on its own (nginx's
    /// `worker_processes`); default: one per CPU, at most 16. 0 serves them on the agent's
    /// own threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
}

fn is_auto(challenge: &crate::ingress::acme::AcmeChallenge) -> bool {
    *challenge == crate::ingress::acme::AcmeChallenge::Auto
}

impl Default for IngressSettings {
    fn default() -> Self {
        IngressSettings {
            enabled: true,
            http: default_ingress_http(),
            https: default_ingress_https(),
            hold: default_hold(),
            redirect: true,
            acme_email: None,
            acme_directory: None,
            acme_ca: None,
            acme_challenge: crate::ingress::acme::AcmeChallenge::Auto,
            workers: None,
        }
    }
}

impl IngressSettings {
    /// A hold the ingress can live with.
    fn check(&self) -> Result<(), String> {
        if self.hold > Duration::from_secs(60) {
            return Err(format!(
                "ingress.hold = \"{}\" is too long: at most 60s",
                p2f_model::format_duration(self.hold)
            ));
        }
        if let Some(workers) = self.workers
            && workers > MAX_INGRESS_WORKERS
        {
            return Err(format!(
                "ingress.workers = {workers} is too many: at most {MAX_INGRESS_WORKERS}"
            ));
        }
        if let Some(email) = &self.acme_email {
            let (user, host) = email.split_once('@').unwrap_or(("", ""));
            if user.is_empty() || !host.contains('.') || email.contains(char::is_whitespace) {
                return Err(format!(
                    "ingress.acme_email = {email:?} is not an email address"
                ));
            }
        }
        if let Some(directory) = &self.acme_directory
            && !directory.starts_with("https://")
        {
            return Err(format!(
                "ingress.acme_directory = {directory:?} must be an https:// URL"
            ));
        }
        Ok(())
    }
}

/// The most worker threads the ingress may be given.
const MAX_INGRESS_WORKERS: usize = 256;

impl IngressSettings {
    /// The ingress's worker threads: as set, or one per CPU (at most 16).
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(16)
        })
    }
}

fn default_ingress_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}

fn default_ingress_https() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

fn default_hold() -> Duration {
    Duration::from_secs(5)
}

/// Where this node gossips, whom it asks first, and how soon a silent node counts as lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSettings {
    /// The UDP address for gossip; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Gossip addresses of nodes to join through (the root's, from the join token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<SocketAddr>,
    /// Time between gossip rounds (default 250ms). Failure detection counts in these rounds.
    #[serde(
        default = "default_gossip_interval",
        with = "p2f_model::duration::serde_str"
    )]
    pub gossip_interval: Duration,
    /// How much silence makes a node lost, as phi-accrual's threshold (default 16): roughly
    /// the number of mean heartbeat intervals tolerated, about half a gossip round each. With
    /// the defaults a silent node is lost after 2.2-2.5 s at 3 nodes and 3.0-3.5 s at 10
    /// (BENCHMARKS.md); 32 doubles that, for a flaky Wi-Fi. The root's setting decides
    /// failover: it is the root that declares a node lost and re-places its processes.
    #[serde(default = "default_phi_threshold")]
    pub phi_threshold: f64,
}

impl MeshSettings {
    /// Gossip on `listen` through `seeds`, with the default timings.
    pub fn new(listen: SocketAddr, seeds: Vec<SocketAddr>) -> MeshSettings {
        MeshSettings {
            listen,
            seeds,
            gossip_interval: default_gossip_interval(),
            phi_threshold: default_phi_threshold(),
        }
    }

    /// Timings the mesh can live with.
    fn check(&self) -> Result<(), String> {
        let interval = self.gossip_interval;
        if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&interval) {
            return Err(format!(
                "mesh.gossip_interval = \"{}\" is out of range: 10ms to 10s",
                p2f_model::format_duration(interval)
            ));
        }
        if !(self.phi_threshold.is_finite() && (1.0..=1000.0).contains(&self.phi_threshold)) {
            return Err(format!(
                "mesh.phi_threshold = {} is out of range: 1 to 1000",
                self.phi_threshold
            ));
        }
        Ok(())
    }
}

fn default_gossip_interval() -> Duration {
    crate::mesh::DEFAULT_GOSSIP_INTERVAL
}

fn default_phi_threshold() -> f64 {
    crate::mesh::DEFAULT_PHI_THRESHOLD
}

/// How the supervisor watches processes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Time between health checks.
    #[serde(with = "p2f_model::duration::serde_str")]
    pub health_interval: Duration,
    /// Failed checks in a row that fail a process.
    pub health_failures: u32,
    /// Time between memory refreshes.
    #[serde(with = "p2f_model::duration::serde_str")]
    pub memory_interval: Duration,
    /// A log file is rotated when it grows past this many bytes.
    pub log_max_bytes: u64,
    /// Rotated log files kept per process.
    pub log_keep: u32,
    /// The longest a deploy step (nix build, a playbook) may take.
    #[serde(with = "p2f_model::duration::serde_str")]
    pub deploy_timeout: Duration,
    /// `--option NAME VALUE` pairs for `nix build`, e.g. `{ substituters = "" }` to build offline.
    pub nix_options: BTreeMap<String, String>,
    /// How the processes are contained (see `node::contain`).
    pub containment: ContainmentMode,
    /// Names of the agent's environment variables that its processes get too; besides these,
    /// only `PATH`, the locale, `TZ`, `TERM` and the user's variables pass (a clean
    /// environment, as systemd gives services).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pass_env: Vec<String>,
}

/// `[supervisor] containment`: how a node keeps track of everything its processes start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainmentMode {
    /// A cgroup v2 per process where the agent can make one; the process tree where not.
    #[default]
    Cgroup,
    /// Always the process tree under each process's relay (no cgroups).
    Tree,
}

impl SupervisorConfig {
    /// Intervals the supervisor can live with (a zero interval would spin or panic).
    fn check(&self) -> Result<(), String> {
        let at_least = |name: &str, value: Duration, min: Duration| {
            if value < min {
                Err(format!(
                    "supervisor.{name} = \"{}\" is too short: at least {}",
                    p2f_model::format_duration(value),
                    p2f_model::format_duration(min)
                ))
            } else {
                Ok(())
            }
        };
        at_least(
            "health_interval",
            self.health_interval,
            Duration::from_millis(50),
        )?;
        at_least(
            "memory_interval",
            self.memory_interval,
            Duration::from_millis(100),
        )?;
        at_least(
            "deploy_timeout",
            self.deploy_timeout,
            Duration::from_secs(1),
        )?;
        if self.health_failures == 0 {
            return Err("supervisor.health_failures must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            health_interval: Duration::from_secs(5),
            health_failures: 3,
            memory_interval: Duration::from_secs(5),
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 3,
            deploy_timeout: Duration::from_secs(30 * 60),
            nix_options: BTreeMap::new(),
            containment: ContainmentMode::default(),
            pass_env: Vec::new(),
        }
    }
}

/// `path` taken from `base` when relative, without `.` components (`base/./x` → `base/x`).
fn relative_to(base: &Path, path: &Path) -> PathBuf {
    base.join(path)
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))
}

fn yes() -> bool {
    true
}

impl AgentConfig {
    /// A configuration with defaults for everything but the name and the data directory.
    pub fn new(name: NodeName, data_dir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            name,
            listen: default_listen(),
            advertise: None,
            data_dir: data_dir.into(),
            root: None,
            cluster_dir: None,
            bare_metal: true,
            unsafe_mode: true,
            supervisor: SupervisorConfig::default(),
            mesh: None,
            ingress: None,
            relay: RelaySettings::default(),
            p2prc: None,
        }
    }

    /// Reads a TOML file. Relative directories in it are taken from the file's directory.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = AgentConfig::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.data_dir = relative_to(base, &config.data_dir);
        config.cluster_dir = config.cluster_dir.map(|dir| relative_to(base, &dir));
        if let Some(ingress) = &mut config.ingress {
            ingress.acme_ca = ingress.acme_ca.take().map(|ca| relative_to(base, &ca));
        }
        if let Some(p2prc) = &mut config.p2prc {
            p2prc.resolve_paths(|path| relative_to(base, path));
        }
        Ok(config)
    }

    /// Parses TOML text; the error is TOML's message (line, column, what was expected), or
    /// names the setting that is out of range.
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        config.supervisor.check()?;
        if let Some(mesh) = &config.mesh {
            mesh.check()?;
        }
        if let Some(ingress) = &config.ingress {
            ingress.check()?;
        }
        if let Some(p2prc) = &config.p2prc {
            p2prc.check()?;
        }
        Ok(config)
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Where the cluster's trust files are.
    pub fn cluster_dir(&self) -> PathBuf {
        self.cluster_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("cluster"))
    }

    /// The host other machines reach this node at.
    pub fn advertised_host(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.ip().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_file_gets_defaults() {
        let config = AgentConfig::parse("name = \"pi\"\ndata_dir = \"/tmp/x\"\n").expect("parse");
        assert_eq!(
            config,
            AgentConfig::new(NodeName::from_static("pi"), "/tmp/x")
        );
        let again = AgentConfig::parse(&config.to_toml()).expect("round trip");
        assert_eq!(again, config);
    }

    #[test]
    fn mesh_timings_default_and_round_trip() {
        let text = "name = \"pi\"\ndata_dir = \"d\"\n[mesh]\nlisten = \"127.0.0.1:7441\"\n";
        let config = AgentConfig::parse(text).expect("parse");
        let mesh = config.mesh.clone().expect("mesh");
        assert_eq!(mesh, MeshSettings::new(mesh.listen, Vec::new()));
        assert_eq!(mesh.gossip_interval, Duration::from_millis(250));
        let tuned = "name = \"pi\"\ndata_dir = \"d\"\n[mesh]\nlisten = \"127.0.0.1:7441\"\n\
                     gossip_interval = \"500ms\"\nphi_threshold = 32\n";
        let tuned = AgentConfig::parse(tuned)
            .expect("parse")
            .mesh
            .expect("mesh");
        assert_eq!(
            (tuned.gossip_interval, tuned.phi_threshold),
            (Duration::from_millis(500), 32.0)
        );
        assert_eq!(AgentConfig::parse(&config.to_toml()), Ok(config));
    }

    #[test]
    fn relay_via_root_is_a_boolean_or_auto() {
        use crate::relay::link::ViaRoot;
        for (given, expected) in [
            ("", ViaRoot::Auto),
            ("[relay]\n", ViaRoot::Auto),
            ("[relay]\nvia_root = \"auto\"\n", ViaRoot::Auto),
            ("[relay]\nvia_root = true\n", ViaRoot::Always),
            ("[relay]\nvia_root = false\n", ViaRoot::Never),
        ] {
            let text = format!("name = \"pi\"\ndata_dir = \"d\"\n{given}");
            let config = AgentConfig::parse(&text).expect("parses");
            assert_eq!(config.relay.via_root, expected, "{given}");
            let again = AgentConfig::parse(&config.to_toml()).expect("round trip");
            assert_eq!(again.relay, config.relay);
        }
        let bad = "name = \"pi\"\ndata_dir = \"d\"\n[relay]\nvia_root = \"yes\"\n";
        let e = AgentConfig::parse(bad).expect_err("refused");
        assert!(e.contains("use true, false or \"auto\""), "{e}");
    }

    #[test]
    fn ingress_defaults_and_round_trips() {
        let text = "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\n";
        let config = AgentConfig::parse(text).expect("parse");
        assert_eq!(config.ingress, Some(IngressSettings::default()));
        let ingress = IngressSettings::default();
        assert_eq!(
            (ingress.http, ingress.https, ingress.hold, ingress.enabled),
            (
                "0.0.0.0:80".parse().expect("addr"),
                "0.0.0.0:443".parse().expect("addr"),
                Duration::from_secs(5),
                true
            )
        );
        assert_eq!(AgentConfig::parse(&config.to_toml()), Ok(config));
        let tuned = "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nenabled = false\n\
                     http = \"127.0.0.1:8080\"\nhold = \"500ms\"\nredirect = false\n";
        let tuned = AgentConfig::parse(tuned)
            .expect("parse")
            .ingress
            .expect("ingress");
        assert_eq!(
            (tuned.enabled, tuned.http.port(), tuned.hold, tuned.redirect),
            (false, 8080, Duration::from_millis(500), false)
        );
        // Worker threads: one per CPU unless set; 0 (the agent's own threads) is allowed.
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(ingress.worker_threads(), cpus.min(16));
        for workers in [0, 3] {
            let text = format!("name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nworkers = {workers}\n");
            let config = AgentConfig::parse(&text).expect("parse");
            let ingress = config.ingress.clone().expect("ingress");
            assert_eq!(ingress.worker_threads(), workers);
            assert_eq!(AgentConfig::parse(&config.to_toml()), Ok(config));
        }
        assert!(
            AgentConfig::parse("name = \"pi\"\ndata_dir = \"d\"\n")
                .expect("parse")
                .ingress
                .is_none()
        );
    }

    #[test]
    fn acme_settings_parse_round_trip_and_resolve_the_ca_path() {
        use crate::ingress::acme::AcmeChallenge;
        let text = "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\n\
                    acme_email = \"me@example.org\"\n\
                    acme_directory = \"https://127.0.0.1:14000/dir\"\n\
                    acme_ca = \"pebble.pem\"\nacme_challenge = \"http-01\"\n";
        let config = AgentConfig::parse(text).expect("parse");
        let ingress = config.ingress.clone().expect("ingress");
        assert_eq!(ingress.acme_email.as_deref(), Some("me@example.org"));
        assert_eq!(
            ingress.acme_directory.as_deref(),
            Some("https://127.0.0.1:14000/dir")
        );
        assert_eq!(ingress.acme_challenge, AcmeChallenge::Http01);
        assert_eq!(AgentConfig::parse(&config.to_toml()), Ok(config));
        // No ACME settings are written by default.
        assert!(
            !AgentConfig::parse("name = \"pi\"\ndata_dir = \"d\"\n[ingress]\n")
                .expect("parse")
                .to_toml()
                .contains("acme")
        );
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).expect("write");
        let loaded = AgentConfig::load(&path).expect("load");
        assert_eq!(
            loaded.ingress.and_then(|i| i.acme_ca),
            Some(dir.path().join("pebble.pem"))
        );
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("name = \"pi\"\n", "missing field `data_dir`"),
            (
                "name = \"pi\"\ndata_dir = \"d\"\nlisten = \"nope\"\n",
                "invalid socket address",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\nport = 1\n",
                "unknown field `port`",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[supervisor]\nhealth_interval = \"5 parsecs\"\n",
                "health_interval",
            ),
            ("name = \"bad name!\"\ndata_dir = \"d\"\n", "name"),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[supervisor]\nhealth_interval = \"0s\"\n",
                "supervisor.health_interval = \"0s\" is too short: at least 50ms",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[mesh]\nlisten = \"127.0.0.1:1\"\ngossip_interval = \"1ms\"\n",
                "mesh.gossip_interval = \"1ms\" is out of range: 10ms to 10s",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[mesh]\nlisten = \"127.0.0.1:1\"\nphi_threshold = 0\n",
                "mesh.phi_threshold = 0 is out of range: 1 to 1000",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nhold = \"2m\"\n",
                "ingress.hold = \"2m\" is too long: at most 60s",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nworkers = 1000\n",
                "ingress.workers = 1000 is too many: at most 256",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nworkers = -1\n",
                "workers",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nport = 80\n",
                "unknown field `port`",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nacme_email = \"me\"\n",
                "ingress.acme_email = \"me\" is not an email address",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nacme_directory = \"http://ca/dir\"\n",
                "must be an https:// URL",
            ),
            (
                "name = \"pi\"\ndata_dir = \"d\"\n[ingress]\nacme_challenge = \"dns-01\"\n",
                "acme_challenge",
            ),
        ];
        for (text, want) in cases {
            let err = AgentConfig::parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
