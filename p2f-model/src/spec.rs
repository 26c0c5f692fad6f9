//! What a user declares: a `Deployment` of `ProcessSpec`s. Specs are immutable values that can
//! be built in `const` context without allocation (the `deployment!` macro does so) or at run
//! time (builders, JSON); `with_*` methods return new values and never mutate in place.

use std::borrow::Cow;
use std::fmt;
use std::mem::ManuallyDrop;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::NodeName;
use crate::duration::serde_str;

/// Static text or owned text: `Cow::Borrowed` in `const` specs, `Cow::Owned` in parsed ones.
pub(crate) type Text = Cow<'static, str>;

/// How a spec is deployed on a node before its `start` command runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub enum Strategy {
    /// Nothing to deploy: `start` runs as it is.
    #[default]
    Shell,
    /// Runs an embedded script (a path inside the bundle) with `sh`.
    Script(Text),
    /// Builds a flake with `nix build`; relative paths (`./dir`) are embedded in the bundle.
    Nix(Text),
    /// Runs an embedded playbook with `ansible-playbook -i localhost, -c local`.
    Ansible(Text),
    /// Runs this deploy command with `sh -c`.
    Custom(Text),
}

impl Strategy {
    /// The strategy's name as written in `deployment!`.
    pub fn kind(&self) -> &'static str {
        match self {
            Strategy::Shell => "Shell",
            Strategy::Script(_) => "Script",
            Strategy::Nix(_) => "Nix",
            Strategy::Ansible(_) => "Ansible",
            Strategy::Custom(_) => "Custom",
        }
    }

    /// The path inside the bundle that this strategy needs, if any (a Nix flake directory
    /// needs its `flake.nix`).
    pub fn bundle_path(&self) -> Option<String> {
        match self {
            Strategy::Script(p) | Strategy::Ansible(p) => Some(normalize_bundle_path(p)),
            Strategy::Nix(p) if is_local_nix_path(p) => {
                let dir = normalize_bundle_path(p);
                Some(if dir.is_empty() {
                    "flake.nix".to_owned()
                } else {
                    format!("{dir}/flake.nix")
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Shell => f.write_str("Shell"),
            Strategy::Script(p) | Strategy::Nix(p) | Strategy::Ansible(p) | Strategy::Custom(p) => {
                write!(f, "{}({p:?})", self.kind())
            }
        }
    }
}

/// The program and arguments a script's `#!` line names (`#!/bin/bash` → `["/bin/bash"]`,
/// `#!/usr/bin/env python3 -u` → `["/usr/bin/env", "python3", "-u"]`), or `None` without one:
/// then it runs under `sh`, as the kernel would not run it at all.
pub fn shebang(contents: &[u8]) -> Option<Vec<String>> {
    let rest = contents.strip_prefix(b"#!")?;
    let line = rest.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).ok()?;
    let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    (!words.is_empty()).then_some(words)
}

/// Whether a Nix installable names a local flake directory (which is embedded in the bundle).
pub fn is_local_nix_path(installable: &str) -> bool {
    installable == "." || installable.starts_with("./") || installable.starts_with("../")
}

/// The path of a file inside a bundle: as written, `/`-separated, without `.` or empty parts;
/// `..` becomes `_parent` and a leading `/` is dropped, so no path leaves the bundle directory.
pub fn normalize_bundle_path(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .map(|part| if part == ".." { "_parent" } else { part })
        .collect();
    parts.join("/")
}

/// How a running process is checked for health.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Health {
    /// A TCP connection to the process's port succeeds.
    Tcp,
    /// `GET path` on the process's port answers 2xx or 3xx.
    Http(Text),
    /// The command exits 0.
    Cmd(Text),
    /// No check: running is healthy.
    None,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Tcp => f.write_str("Tcp"),
            Health::Http(p) => write!(f, "Http({p:?})"),
            Health::Cmd(c) => write!(f, "Cmd({c:?})"),
            Health::None => f.write_str("None"),
        }
    }
}

/// When a process that exited is started again on the same node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum RestartPolicy {
    /// After every exit, without limit.
    Always,
    /// After a failing exit, at most this many times in a row.
    OnFailure(u32),
    /// Never.
    Never,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::DEFAULT
    }
}

impl RestartPolicy {
    /// `OnFailure(5)`, the default.
    pub const DEFAULT: RestartPolicy = RestartPolicy::OnFailure(5);
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::Always => f.write_str("Always"),
            RestartPolicy::OnFailure(n) => write!(f, "OnFailure({n})"),
            RestartPolicy::Never => f.write_str("Never"),
        }
    }
}

/// One environment variable of a spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvVar {
    name: Text,
    value: Text,
}

impl EnvVar {
    /// A variable from literals (usable in `const`).
    pub const fn new(name: &'static str, value: &'static str) -> EnvVar {
        EnvVar {
            name: Cow::Borrowed(name),
            value: Cow::Borrowed(value),
        }
    }

    /// A variable from run-time text.
    pub fn owned(name: impl Into<String>, value: impl Into<String>) -> EnvVar {
        EnvVar {
            name: Cow::Owned(name.into()),
            value: Cow::Owned(value.into()),
        }
    }

    /// The variable's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The variable's value.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// One file of a bundle.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    path: Text,
    #[serde(with = "base64_bytes")]
    contents: Cow<'static, [u8]>,
}

impl BundleFile {
    /// A file from literals, e.g. `include_bytes!` (usable in `const`).
    pub const fn new(path: &'static str, contents: &'static [u8]) -> BundleFile {
        BundleFile {
            path: Cow::Borrowed(path),
            contents: Cow::Borrowed(contents),
        }
    }

    /// A file from run-time data.
    pub fn owned(path: impl Into<String>, contents: Vec<u8>) -> BundleFile {
        BundleFile {
            path: Cow::Owned(path.into()),
            contents: Cow::Owned(contents),
        }
    }

    /// The file's path inside the bundle (relative, `/`-separated).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The file's bytes.
    pub fn contents(&self) -> &[u8] {
        &self.contents
    }
}

impl fmt::Debug for BundleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BundleFile({:?}, {} bytes)",
            self.path,
            self.contents.len()
        )
    }
}

/// The files a spec's strategy needs, embedded at build time: the seed's "encoded deployment
/// script". It travels with the process record, so any node can reproduce the process.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Bundle {
    files: Cow<'static, [BundleFile]>,
}

impl Bundle {
    /// No files.
    pub const EMPTY: Bundle = Bundle {
        files: Cow::Borrowed(&[]),
    };

    /// A bundle of static files (usable in `const`).
    pub const fn from_static(files: &'static [BundleFile]) -> Bundle {
        Bundle {
            files: Cow::Borrowed(files),
        }
    }

    /// A bundle from run-time files.
    pub fn owned(files: Vec<BundleFile>) -> Bundle {
        Bundle {
            files: Cow::Owned(files),
        }
    }

    /// The files.
    pub fn files(&self) -> &[BundleFile] {
        &self.files
    }

    /// The file at `path`, if the bundle has it.
    pub fn file(&self, path: &str) -> Option<&BundleFile> {
        self.files.iter().find(|f| f.path() == path)
    }

    /// Total size of the files in bytes.
    pub fn size(&self) -> usize {
        self.files.iter().map(|f| f.contents.len()).sum()
    }

    /// Whether the bundle has no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// The transport of a public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (`"tcp"` in JSON).
    Tcp,
    /// UDP (`"udp"` in JSON).
    Udp,
}

impl Protocol {
    /// The protocol's name as written in `deployment!` (`Tcp`, `Udp`).
    pub const fn kind(self) -> &'static str {
        match self {
            Protocol::Tcp => "Tcp",
            Protocol::Udp => "Udp",
        }
    }
}

impl fmt::Display for Protocol {
    /// `TCP` or `UDP`, as messages name them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A port the root opens to the outside for a service, forwarded to port `target` of the
/// service's process on whichever node runs it now: `Tcp(25565)` (public 25565 → 25565) or
/// `Tcp(8022 => 22)` (public 8022 → 22) in `deployment!`.
///
/// JSON: `{"protocol": "tcp", "public": 8022, "target": 22}`, always written with all three
/// keys; `target` may be left out when reading, and is then `public`. Nothing is checked here:
/// port 0, a port claimed twice and one the root itself holds are findings of
/// [`crate::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "public_port_json::Loose")]
pub struct PublicPort {
    protocol: Protocol,
    public: u16,
    target: u16,
}

impl PublicPort {
    /// Public `public` forwarded to the process's `target` (usable in `const`).
    pub const fn new(protocol: Protocol, public: u16, target: u16) -> PublicPort {
        PublicPort {
            protocol,
            public,
            target,
        }
    }

    /// TCP `port` forwarded to the same port of the process: `Tcp(port)`.
    pub const fn tcp(port: u16) -> PublicPort {
        PublicPort::new(Protocol::Tcp, port, port)
    }

    /// UDP `port` forwarded to the same port of the process: `Udp(port)`.
    pub const fn udp(port: u16) -> PublicPort {
        PublicPort::new(Protocol::Udp, port, port)
    }

    /// TCP or UDP.
    pub const fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The port opened on the root.
    pub const fn public(&self) -> u16 {
        self.public
    }

    /// The port of the process it is forwarded to.
    pub const fn target(&self) -> u16 {
        self.target
    }
}

impl fmt::Display for PublicPort {
    /// As written in `deployment!`: `Tcp(25565)`, `Udp(8022 => 22)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.protocol.kind();
        if self.public == self.target {
            write!(f, "{kind}({})", self.public)
        } else {
            write!(f, "{kind}({} => {})", self.public, self.target)
        }
    }
}

/// A public port read from JSON, where `target` defaults to `public`.
mod public_port_json {
    use serde::Deserialize;

    use super::{Protocol, PublicPort};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Loose {
        protocol: Protocol,
        public: u16,
        #[serde(default)]
        target: Option<u16>,
    }

    impl From<Loose> for PublicPort {
        fn from(loose: Loose) -> PublicPort {
            PublicPort::new(
                loose.protocol,
                loose.public,
                loose.target.unwrap_or(loose.public),
            )
        }
    }
}

/// The fields of a `ProcessSpec`, spelled out: what `deployment!` writes, and what a user can
/// write by hand in a `const` (`ProcessSpec::from_parts(SpecParts { .. })`).
#[derive(Debug, Clone)]
pub struct SpecParts {
    /// The service name (an identifier).
    pub name: Text,
    /// The command that starts the process (run with `sh -c`).
    pub start: Text,
    /// The command that stops it; `None`: SIGTERM to the group, SIGKILL after `grace`.
    pub stop: Option<Text>,
    /// The port it listens on.
    pub port: Option<u16>,
    /// How it is deployed.
    pub strategy: Strategy,
    /// The domain name the root routes to it.
    pub domain: Option<Text>,
    /// The ports the root opens to the outside for it; empty: none.
    pub public: Cow<'static, [PublicPort]>,
    /// The nodes it may run on; empty: any node.
    pub pin: Cow<'static, [NodeName]>,
    /// Services of the same deployment that start before it.
    pub after: Cow<'static, [Text]>,
    /// Its health check; `None`: the default (Tcp with a port, else no check).
    pub health: Option<Health>,
    /// When it is restarted in place.
    pub restart: RestartPolicy,
    /// How long `stop` may take before SIGKILL.
    pub grace: Duration,
    /// Extra environment variables.
    pub env: Cow<'static, [EnvVar]>,
    /// The OS user it runs as; `None`: the agent's user.
    pub user: Option<Text>,
    /// The embedded files its strategy needs.
    pub bundle: Bundle,
}

/// The default `grace`: 10 s.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// One service as the user declared it: immutable, validated by [`crate::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    name: Text,
    start: Text,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stop: Option<Text>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default)]
    strategy: Strategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    domain: Option<Text>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    public: Cow<'static, [PublicPort]>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pin: Cow<'static, [NodeName]>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    after: Cow<'static, [Text]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health: Option<Health>,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default = "default_grace", with = "serde_str")]
    grace: Duration,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty", with = "env_map")]
    env: Cow<'static, [EnvVar]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<Text>,
    #[serde(default, skip_serializing_if = "Bundle::is_empty")]
    bundle: Bundle,
}

fn default_grace() -> Duration {
    DEFAULT_GRACE
}

impl ProcessSpec {
    /// A spec from its parts, in `const` context or at run time. Nothing is checked here:
    /// `deployment!` checks at compile time, [`crate::validate`] at run time.
    pub const fn from_parts(parts: SpecParts) -> ProcessSpec {
        let parts = ManuallyDrop::new(parts);
        let p: *const SpecParts = (&raw const parts).cast();
        // SAFETY: `ManuallyDrop<SpecParts>` has the layout of `SpecParts`; each field is read
        // exactly once and `parts` is never dropped, so every value is moved, not duplicated.
        unsafe {
            ProcessSpec {
                name: std::ptr::read(&raw const (*p).name),
                start: std::ptr::read(&raw const (*p).start),
                stop: std::ptr::read(&raw const (*p).stop),
                port: (*p).port,
                strategy: std::ptr::read(&raw const (*p).strategy),
                domain: std::ptr::read(&raw const (*p).domain),
                public: std::ptr::read(&raw const (*p).public),
                pin: std::ptr::read(&raw const (*p).pin),
                after: std::ptr::read(&raw const (*p).after),
                health: std::ptr::read(&raw const (*p).health),
                restart: (*p).restart,
                grace: (*p).grace,
                env: std::ptr::read(&raw const (*p).env),
                user: std::ptr::read(&raw const (*p).user),
                bundle: std::ptr::read(&raw const (*p).bundle),
            }
        }
    }

    /// A spec with a name and a start command and every other field at its default
    /// (run time; in a `const`, use [`ProcessSpec::from_parts`] or `deployment!`).
    pub fn new(name: impl Into<String>, start: impl Into<String>) -> ProcessSpec {
        ProcessSpec::from_parts(SpecParts {
            name: Cow::Owned(name.into()),
            start: Cow::Owned(start.into()),
            stop: None,
            port: None,
            strategy: Strategy::Shell,
            domain: None,
            public: Cow::Borrowed(&[]),
            pin: Cow::Borrowed(&[]),
            after: Cow::Borrowed(&[]),
            health: None,
            restart: RestartPolicy::DEFAULT,
            grace: DEFAULT_GRACE,
            env: Cow::Borrowed(&[]),
            user: None,
            bundle: Bundle::EMPTY,
        })
    }

    /// The spec's fields, for a functional update.
    pub fn to_parts(&self) -> SpecParts {
        SpecParts {
            name: self.name.clone(),
            start: self.start.clone(),
            stop: self.stop.clone(),
            port: self.port,
            strategy: self.strategy.clone(),
            domain: self.domain.clone(),
            public: self.public.clone(),
            pin: self.pin.clone(),
            after: self.after.clone(),
            health: self.health.clone(),
            restart: self.restart,
            grace: self.grace,
            env: self.env.clone(),
            user: self.user.clone(),
            bundle: self.bundle.clone(),
        }
    }

    fn with(&self, update: impl FnOnce(&mut SpecParts)) -> ProcessSpec {
        let mut parts = self.to_parts();
        update(&mut parts);
        ProcessSpec::from_parts(parts)
    }

    /// The fields whose value differs in `other`, in the language's order. The embedded files
    /// count as part of `strategy` (they are what it deploys).
    pub fn changed_fields(&self, other: &ProcessSpec) -> Vec<crate::Field> {
        use crate::Field;
        Field::ALL
            .into_iter()
            .filter(|field| match field {
                Field::Start => self.start() != other.start(),
                Field::Port => self.port() != other.port(),
                Field::Stop => self.stop() != other.stop(),
                Field::Strategy => {
                    self.strategy() != other.strategy() || self.bundle() != other.bundle()
                }
                Field::Domain => self.domain() != other.domain(),
                Field::Public => self.public() != other.public(),
                Field::Pin => self.pin() != other.pin(),
                Field::After => !self.after().eq(other.after()),
                Field::Health => self.declared_health() != other.declared_health(),
                Field::Restart => self.restart() != other.restart(),
                Field::Grace => self.grace() != other.grace(),
                Field::Env => self.env() != other.env(),
                Field::User => self.user() != other.user(),
            })
            .collect()
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The start command.
    pub fn start(&self) -> &str {
        &self.start
    }
    /// The stop command, if one was declared.
    pub fn stop(&self) -> Option<&str> {
        self.stop.as_deref()
    }
    /// The port, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
    /// The deploy strategy.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }
    /// The domain name, if any.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }
    /// The ports the root opens to the outside for it, in declaration order; empty: none.
    pub fn public(&self) -> &[PublicPort] {
        &self.public
    }
    /// The nodes it may run on; empty means any node.
    pub fn pin(&self) -> &[NodeName] {
        &self.pin
    }
    /// Services that start before it.
    pub fn after(&self) -> impl ExactSizeIterator<Item = &str> {
        self.after.iter().map(|a| &**a)
    }
    /// The health check as declared (`None`: not declared).
    pub fn declared_health(&self) -> Option<&Health> {
        self.health.as_ref()
    }
    /// The effective health check: as declared, else Tcp with a port, else none.
    pub fn health(&self) -> Health {
        match (&self.health, self.port) {
            (Some(h), _) => h.clone(),
            (None, Some(_)) => Health::Tcp,
            (None, None) => Health::None,
        }
    }
    /// The restart policy.
    pub fn restart(&self) -> RestartPolicy {
        self.restart
    }
    /// How long a stop may take before SIGKILL.
    pub fn grace(&self) -> Duration {
        self.grace
    }
    /// Extra environment variables.
    pub fn env(&self) -> &[EnvVar] {
        &self.env
    }
    /// The OS user it runs as, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    /// The embedded files.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }
    /// Whether it may run on `node`.
    pub fn allows(&self, node: &NodeName) -> bool {
        self.pin.is_empty() || self.pin.contains(node)
    }

    /// A copy with this port.
    pub fn with_port(&self, port: u16) -> ProcessSpec {
        self.with(|p| p.port = Some(port))
    }
    /// A copy without a port.
    pub fn without_port(&self) -> ProcessSpec {
        self.with(|p| p.port = None)
    }
    /// A copy with this start command.
    pub fn with_start(&self, start: impl Into<String>) -> ProcessSpec {
        self.with(|p| p.start = Cow::Owned(start.into()))
    }
    /// A copy with this stop command.
    pub fn with_stop(&self, stop: impl Into<String>) -> ProcessSpec {
        self.with(|p| p.stop = Some(Cow::Owned(stop.into())))
    }
    /// A copy with this strategy.
    pub fn with_strategy(&self, strategy: Strategy) -> ProcessSpec {
        self.with(|p| p.strategy = strategy)
    }
    /// A copy with this domain.
    pub fn with_domain(&self, domain: impl Into<String>) -> ProcessSpec {
        self.with(|p| p.domain = Some(Cow::Owned(domain.into())))
    }
    /// A copy with these public ports (replacing any it had; empty: none).
    pub fn with_public(&self, ports: impl IntoIterator<Item = PublicPort>) -> ProcessSpec {
        let ports: Vec<PublicPort> = ports.into_iter().collect();
        self.with(|p| p.public = Cow::Owned(ports))
    }
    /// A copy pinned to these nodes (empty: any node).
    pub fn with_pin(&self, nodes: impl IntoIterator<Item = NodeName>) -> ProcessSpec {
        let nodes: Vec<NodeName> = nodes.into_iter().collect();
        self.with(|p| p.pin = Cow::Owned(nodes))
    }
    /// A copy that starts after these services.
    pub fn with_after<S: Into<String>>(
        &self,
        services: impl IntoIterator<Item = S>,
    ) -> ProcessSpec {
        let after: Vec<Text> = services.into_iter().map(|s| Cow::Owned(s.into())).collect();
        self.with(|p| p.after = Cow::Owned(after))
    }
    /// A copy with this health check.
    pub fn with_health(&self, health: Health) -> ProcessSpec {
        self.with(|p| p.health = Some(health))
    }
    /// A copy with this restart policy.
    pub fn with_restart(&self, restart: RestartPolicy) -> ProcessSpec {
        self.with(|p| p.restart = restart)
    }
    /// A copy with this grace period.
    pub fn with_grace(&self, grace: Duration) -> ProcessSpec {
        self.with(|p| p.grace = grace)
    }
    /// A copy with this variable added (or replaced).
    pub fn with_env(&self, name: impl Into<String>, value: impl Into<String>) -> ProcessSpec {
        let (name, value) = (name.into(), value.into());
        self.with(|p| {
            let mut env: Vec<EnvVar> = p.env.iter().filter(|v| v.name() != name).cloned().collect();
            env.push(EnvVar::owned(name, value));
            p.env = Cow::Owned(env);
        })
    }
    /// A copy running as this OS user.
    pub fn with_user(&self, user: impl Into<String>) -> ProcessSpec {
        self.with(|p| p.user = Some(Cow::Owned(user.into())))
    }
    /// A copy with this bundle.
    pub fn with_bundle(&self, bundle: Bundle) -> ProcessSpec {
        self.with(|p| p.bundle = bundle)
    }
}

/// What the user wants running: the nodes they name and the services to place on them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    nodes: Cow<'static, [NodeName]>,
    services: Cow<'static, [ProcessSpec]>,
}

impl Deployment {
    /// A deployment from static parts (usable in `const`; what `deployment!` writes).
    pub const fn new(nodes: &'static [NodeName], services: &'static [ProcessSpec]) -> Deployment {
        Deployment {
            nodes: Cow::Borrowed(nodes),
            services: Cow::Borrowed(services),
        }
    }

    /// A deployment from run-time parts.
    pub fn owned(nodes: Vec<NodeName>, services: Vec<ProcessSpec>) -> Deployment {
        Deployment {
            nodes: Cow::Owned(nodes),
            services: Cow::Owned(services),
        }
    }

    /// The declared nodes; empty when the deployment does not restrict them.
    pub fn nodes(&self) -> &[NodeName] {
        &self.nodes
    }

    /// The services, in declaration order.
    pub fn services(&self) -> &[ProcessSpec] {
        &self.services
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ProcessSpec> {
        self.services.iter().find(|s| s.name() == name)
    }

    /// The services in an order that respects `after` (dependencies first; ties keep
    /// declaration order). Services caught in a cycle (rejected by validation) come last.
    pub fn start_order(&self) -> Vec<&ProcessSpec> {
        let mut done: Vec<bool> = vec![false; self.services.len()];
        let mut order = Vec::with_capacity(self.services.len());
        while order.len() < self.services.len() {
            let ready = self.services.iter().enumerate().find(|(i, s)| {
                !done[*i]
                    && s.after().all(|dep| {
                        self.services
                            .iter()
                            .position(|o| o.name() == dep)
                            .is_none_or(|j| done[j])
                    })
            });
            match ready {
                Some((i, s)) => {
                    done[i] = true;
                    order.push(s);
                }
                None => {
                    order.extend(
                        self.services
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| !done[*i])
                            .map(|(_, s)| s),
                    );
                    break;
                }
            }
        }
        order
    }
}

/// Environment variables travel as a JSON object `{ "NAME": "value" }`, in declaration order.
mod env_map {
    use std::borrow::Cow;

    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    use super::EnvVar;

    pub(super) fn serialize<S: Serializer>(env: &[EnvVar], s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(env.len()))?;
        for var in env.iter() {
            map.serialize_entry(var.name(), var.value())?;
        }
        map.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Cow<'static, [EnvVar]>, D::Error> {
        struct EnvVisitor;
        impl<'de> Visitor<'de> for EnvVisitor {
            type Value = Vec<EnvVar>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of environment variables")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut vars = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, String>()? {
                    vars.push(EnvVar::owned(name, value));
                }
                Ok(vars)
            }
        }
        d.deserialize_map(EnvVisitor).map(Cow::Owned)
    }
}

/// Bundle bytes travel as base64 text.
mod base64_bytes {
    use std::borrow::Cow;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Cow<'static, [u8]>, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map(Cow::Owned)
            .map_err(serde::de::Error::custom)
    }
}
