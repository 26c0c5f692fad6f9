//! The rules of the `deployment!` language, written once. The macro runs them at compile time
//! and maps each finding's [`Location`] back to a token; the runtime runs the same functions on
//! specs that arrive as JSON or from a builder. Every rule reports every violation it sees.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Deployment, NodeName, ProcessSpec, Protocol, Strategy};

/// A field of a `service` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    Start,
    Port,
    Stop,
    Strategy,
    Domain,
    Public,
    Pin,
    After,
    Health,
    Restart,
    Grace,
    Env,
    User,
}

impl Field {
    /// Every field, in the order the language documents them.
    pub const ALL: [Field; 13] = [
        Field::Start,
        Field::Port,
        Field::Stop,
        Field::Strategy,
        Field::Domain,
        Field::Public,
        Field::Pin,
        Field::After,
        Field::Health,
        Field::Restart,
        Field::Grace,
        Field::Env,
        Field::User,
    ];

    /// The field's name as written.
    pub const fn name(self) -> &'static str {
        match self {
            Field::Start => "start",
            Field::Port => "port",
            Field::Stop => "stop",
            Field::Strategy => "strategy",
            Field::Domain => "domain",
            Field::Public => "public",
            Field::Pin => "pin",
            Field::After => "after",
            Field::Health => "health",
            Field::Restart => "restart",
            Field::Grace => "grace",
            Field::Env => "env",
            Field::User => "user",
        }
    }

    /// The field called `name`.
    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a finding points: the macro turns it into a span, the runtime into a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    /// The deployment as a whole.
    Deployment,
    /// Entry `n` of `nodes: [...]`.
    Node(usize),
    /// The name of service `n`.
    Service(usize),
    /// The value of a field of service `n`.
    Field(usize, Field),
    /// Item `i` of a list field (`public`, `pin`, `after`, `env`) of service `n`.
    Item(usize, Field, usize),
}

/// Which rule a finding breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Rule {
    /// A field name the language does not have.
    UnknownField,
    /// A field given twice in one service.
    DuplicateField,
    /// A service without `start` (or with an empty one).
    MissingStart,
    /// An expression where the language needs a literal.
    NotALiteral,
    /// A service name that is not an identifier.
    InvalidServiceName,
    /// Port 0 or above 65535 (in `port` or in a public port).
    PortOutOfRange,
    /// Two services with one name.
    DuplicateService,
    /// Two services with one domain.
    DuplicateDomain,
    /// A domain that is not an RFC 1123 name.
    InvalidDomain,
    /// A domain on a service without a port.
    DomainWithoutPort,
    /// A pin naming a node missing from `nodes`.
    UnknownPin,
    /// An `after` naming no service of the deployment.
    UnknownAfter,
    /// `after` edges that form a cycle.
    AfterCycle,
    /// Two services that could land on one node with one port.
    PortConflict,
    /// A file the strategy needs is missing.
    MissingFile,
    /// A duration that does not parse.
    BadDuration,
    /// An environment variable name that is not a POSIX name, or one P2F sets itself.
    InvalidEnvName,
    /// A node name twice in `nodes`.
    DuplicateNode,
    /// An embedded script or playbook the shell would misread: Windows (CRLF) line ends, or a
    /// byte-order mark.
    FileContent,
    /// One public port (protocol and number) claimed twice in a deployment.
    DuplicatePublicPort,
    /// A public port that the root itself holds (its ingress's HTTP or HTTPS port).
    ReservedPublicPort,
    /// A string the OS cannot take (a NUL byte in a command, an env value or a user name; an
    /// empty user or one with `:`, `/` or spaces).
    NotAnOsString,
}

/// One violation of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The rule broken.
    pub rule: Rule,
    /// Where.
    pub at: Location,
    /// What is wrong, in one line.
    pub message: String,
    /// How to fix it, when there is something to suggest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl Finding {
    fn new(rule: Rule, at: Location, message: impl Into<String>) -> Finding {
        Finding {
            rule,
            at,
            message: message.into(),
            help: None,
        }
    }

    fn help(mut self, help: Option<String>) -> Finding {
        self.help = help;
        self
    }

    /// A readable path to the offending place, e.g. `services.wiki.port`.
    pub fn path(&self, deployment: &Deployment) -> String {
        let service = |n: usize| {
            deployment
                .services()
                .get(n)
                .map_or("?", |s| s.name())
                .to_owned()
        };
        match self.at {
            Location::Deployment => "deployment".to_owned(),
            Location::Node(i) => format!("nodes[{i}]"),
            Location::Service(n) => format!("services.{}", service(n)),
            Location::Field(n, f) => format!("services.{}.{f}", service(n)),
            Location::Item(n, f, i) => format!("services.{}.{f}[{i}]", service(n)),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, "; {help}")?;
        }
        Ok(())
    }
}

/// A spec or deployment that breaks rules: every finding, with readable paths.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid deployment: {}", .findings.iter().map(|(p, f)| format!("{p}: {f}")).collect::<Vec<_>>().join("; "))]
pub struct Invalid {
    /// Each finding with the path it points at.
    pub findings: Vec<(String, Finding)>,
}

impl Deployment {
    /// Checks every rule; `Err` lists every finding.
    pub fn validate(&self) -> Result<(), Invalid> {
        let findings = deployment(self);
        if findings.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                findings: findings.into_iter().map(|f| (f.path(self), f)).collect(),
            })
        }
    }
}

impl ProcessSpec {
    /// Checks the rules that concern one spec alone (not `after`, which names other services
    /// of its deployment); `Err` lists every finding.
    pub fn validate(&self) -> Result<(), Invalid> {
        let single = Deployment::owned(Vec::new(), vec![self.clone()]);
        let mut findings = Vec::new();
        single_spec(0, self, &mut findings);
        public_ports(&single, &mut findings);
        if findings.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                findings: findings.into_iter().map(|f| (f.path(&single), f)).collect(),
            })
        }
    }
}

/// The closest candidate to a misspelled `name`, phrased as a hint.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

/// Rule: a field name must be one of the language's fields.
pub fn unknown_field(name: &str, service: usize) -> Finding {
    Finding::new(
        Rule::UnknownField,
        Location::Service(service),
        format!("unknown field `{name}`"),
    )
    .help(
        did_you_mean(name, Field::ALL.iter().map(|f| f.name())).or_else(|| {
            let all: Vec<&str> = Field::ALL.iter().map(|f| f.name()).collect();
            Some(format!("expected one of: {}", all.join(", ")))
        }),
    )
}

/// Rule: a port is 1..=65535 (0 means "any" to the OS, which a record cannot track).
pub fn port(n: u64) -> Result<u16, String> {
    port_in_range(n, "omit `port` for a worker without one")
}

/// Rule: both numbers of a public port (`Tcp(PUBLIC => TARGET)`) are 1..=65535: the root
/// cannot open "any port" for the outside, nor forward to one.
pub fn public_port(n: u64) -> Result<u16, String> {
    port_in_range(n, "a public port is forwarded from and to a fixed port")
}

fn port_in_range(n: u64, why_not_zero: &str) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(0) => Err(format!(
            "port 0 is not allowed: use 1..=65535 ({why_not_zero})"
        )),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("port {n} is out of range: use 1..=65535")),
    }
}

/// The ports the root's ingress listens on by default (`p2f init` writes HTTP on 80, HTTPS on
/// 443), as `(protocol, port, holder)` for [`public_port_clashes`]. [`deployment`] (and so
/// the macro, which cannot see the root's configuration) keeps these free of public ports;
/// the root checks the ports it really holds with [`public_port_clashes`].
pub const INGRESS_PORTS: [(Protocol, u16, &str); 2] = [
    (Protocol::Tcp, 80, "the ingress (HTTP)"),
    (Protocol::Tcp, 443, "the ingress (HTTPS)"),
];

/// Rule: a domain is an RFC 1123 host name.
pub fn dns_name(name: &str) -> Result<(), String> {
    let reject = |why: &str| Err(format!("invalid domain `{name}`: {why}"));
    if name.is_empty() {
        return reject("it is empty");
    }
    if name.len() > 253 {
        return reject("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return reject("empty label");
        }
        if label.len() > 63 {
            return reject(&format!("label `{label}` is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return reject(&format!(
                "`{c}` is not allowed (letters, digits and '-' only)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return reject(&format!("label `{label}` starts or ends with '-'"));
        }
    }
    Ok(())
}

/// Variables P2F sets itself; a spec may not override them.
pub const RESERVED_ENV: [&str; 7] = [
    "PORT",
    "P2F_SERVICE",
    "P2F_NODE",
    "P2F_PROCESS_ID",
    "P2F_GENERATION",
    "P2F_BUNDLE",
    "P2F_NIX_OUT",
];

/// Rule: an environment variable name is a POSIX name and not one P2F sets.
pub fn env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "invalid environment variable name `{name}`: use letters, digits and '_', not starting with a digit"
        ));
    }
    if RESERVED_ENV.contains(&name) {
        return Err(format!(
            "`{name}` is set by P2F itself and cannot be overridden"
        ));
    }
    Ok(())
}

/// Rule: a service name is an identifier that fits in a process id and a DNS label.
pub fn service_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Ok(())
    } else {
        Err(format!(
            "invalid service name `{name}`: use up to 63 ASCII letters, digits, '_' or '-', starting with a letter"
        ))
    }
}

/// Checks every rule of a deployment that can be checked on the model (the syntactic ones —
/// unknown or duplicated fields, literals — belong to the parser) and returns every finding.
pub fn deployment(d: &Deployment) -> Vec<Finding> {
    let mut out = Vec::new();
    nodes_are_unique(d, &mut out);
    for (n, spec) in d.services().iter().enumerate() {
        single_spec(n, spec, &mut out);
        pins_are_declared(d, n, spec, &mut out);
    }
    names_are_unique(d, &mut out);
    domains_are_unique(d, &mut out);
    after_names_services(d, &mut out);
    after_has_no_cycle(d, &mut out);
    ports_do_not_collide(d, &mut out);
    public_ports(d, &mut out);
    out
}

/// The rules about public ports across a deployment: each is claimed once, and none is one of
/// [`INGRESS_PORTS`].
fn public_ports(d: &Deployment, out: &mut Vec<Finding>) {
    public_ports_are_unique(d, out);
    out.extend(public_port_clashes(d, &INGRESS_PORTS));
}

/// The rules about one spec on its own.
fn single_spec(n: usize, spec: &ProcessSpec, out: &mut Vec<Finding>) {
    // A service name ends up in process ids, log file names and DNS labels.
    if let Err(e) = service_name(spec.name()) {
        out.push(Finding::new(
            Rule::InvalidServiceName,
            Location::Service(n),
            e,
        ));
    }
    // A process with nothing to run cannot be supervised.
    if spec.start().trim().is_empty() {
        out.push(Finding::new(
            Rule::MissingStart,
            Location::Field(n, Field::Start),
            "`start` is empty",
        ));
    }
    if let Some(p) = spec.port()
        && let Err(e) = port(p.into())
    {
        out.push(Finding::new(
            Rule::PortOutOfRange,
            Location::Field(n, Field::Port),
            e,
        ));
    }
    // A public port may forward to another port than `port` (a game's query port, SSH on
    // 8022 → 22), and a service without `port` may have public ports: `port` is what the agent
    // checks and hands over as `$PORT`, a public port only what the root forwards.
    for (i, public) in spec.public().iter().enumerate() {
        let bad = [public.public(), public.target()]
            .into_iter()
            .find_map(|p| public_port(p.into()).err());
        if let Some(e) = bad {
            out.push(Finding::new(
                Rule::PortOutOfRange,
                Location::Item(n, Field::Public, i),
                e,
            ));
        }
    }
    if let Some(domain) = spec.domain() {
        // The root routes a domain to a port: without one there is nothing to route to.
        if spec.port().is_none() {
            out.push(
                Finding::new(
                    Rule::DomainWithoutPort,
                    Location::Field(n, Field::Domain),
                    "`domain` needs `port`",
                )
                .help(Some("add `port: N` to this service".into())),
            );
        }
        if let Err(e) = dns_name(domain) {
            out.push(Finding::new(
                Rule::InvalidDomain,
                Location::Field(n, Field::Domain),
                e,
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, var) in spec.env().iter().enumerate() {
        let at = Location::Item(n, Field::Env, i);
        if let Err(e) = env_name(var.name()) {
            out.push(Finding::new(Rule::InvalidEnvName, at, e));
        } else if !seen.insert(var.name()) {
            out.push(Finding::new(
                Rule::InvalidEnvName,
                at,
                format!("`{}` is set twice", var.name()),
            ));
        }
    }
    os_strings(n, spec, out);
    // The bundle is what makes a process reproducible on any node: the file the strategy runs
    // must travel with it, in a form its interpreter reads.
    if let Some(path) = spec.strategy().bundle_path()
        && let Some(file) = spec.bundle().file(&path)
        && let Some((what, help)) = file_content(file.contents())
    {
        let named = match spec.strategy() {
            Strategy::Script(file) | Strategy::Ansible(file) => file.to_string(),
            _ => path.clone(),
        };
        out.push(
            Finding::new(
                Rule::FileContent,
                Location::Field(n, Field::Strategy),
                format!("`{named}` {what}"),
            )
            .help(Some(help.into())),
        );
    }
    if let Some(path) = spec.strategy().bundle_path()
        && spec.bundle().file(&path).is_none()
    {
        let what = match spec.strategy() {
            Strategy::Nix(dir) => format!("the Nix flake directory `{dir}` has no `flake.nix`"),
            _ => format!("file `{path}` is not in the bundle"),
        };
        out.push(Finding::new(
            Rule::MissingFile,
            Location::Field(n, Field::Strategy),
            what,
        ));
    }
}

/// What is wrong with a script's or playbook's bytes for its interpreter, and the fix: a
/// byte-order mark (the shebang is not seen, `sh` reads it as a command) or CRLF line ends
/// (every line ends in `\r`: `set: Illegal option -`). Empty contents (a file the macro has not
/// read) pass.
fn file_content(contents: &[u8]) -> Option<(&'static str, &'static str)> {
    if contents.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Some((
            "starts with a byte-order mark",
            "save it as UTF-8 without BOM",
        ));
    }
    if contents.windows(2).any(|w| w == b"\r\n") {
        return Some((
            "has Windows (CRLF) line ends",
            "convert it to LF line ends (`dos2unix FILE`, or your editor's line-ending setting)",
        ));
    }
    None
}

/// Every string of `spec` the OS must take as a C string or a user name.
fn os_strings(n: usize, spec: &ProcessSpec, out: &mut Vec<Finding>) {
    let nul = |text: &str| text.contains('\0');
    let mut check = |at: Location, what: &str, bad: bool| {
        if bad {
            out.push(
                Finding::new(
                    Rule::NotAnOsString,
                    at,
                    format!("{what} contains a NUL byte, which no OS command can take"),
                )
                .help(Some("remove the `\\0`".into())),
            );
        }
    };
    check(
        Location::Field(n, Field::Start),
        "`start`",
        nul(spec.start()),
    );
    if let Some(stop) = spec.stop() {
        check(Location::Field(n, Field::Stop), "`stop`", nul(stop));
    }
    if let Strategy::Custom(command) = spec.strategy() {
        check(
            Location::Field(n, Field::Strategy),
            "the deploy command",
            nul(command),
        );
    }
    if let Some(crate::Health::Cmd(command)) = spec.declared_health() {
        check(
            Location::Field(n, Field::Health),
            "the health command",
            nul(command),
        );
    }
    for (i, var) in spec.env().iter().enumerate() {
        let at = Location::Item(n, Field::Env, i);
        check(
            at,
            &format!("the value of `{}`", var.name()),
            nul(var.value()),
        );
    }
    if let Some(user) = spec.user()
        && (user.is_empty()
            || user.contains(['\0', ':', '/'])
            || user.contains(char::is_whitespace))
    {
        out.push(Finding::new(
            Rule::NotAnOsString,
            Location::Field(n, Field::User),
            format!(
                "`{}` is not a user name an OS can have",
                user.escape_debug()
            ),
        ));
    }
}

fn nodes_are_unique(d: &Deployment, out: &mut Vec<Finding>) {
    let mut seen = BTreeSet::new();
    for (i, node) in d.nodes().iter().enumerate() {
        if !seen.insert(node) {
            out.push(Finding::new(
                Rule::DuplicateNode,
                Location::Node(i),
                format!("node `{node}` is listed twice"),
            ));
        }
    }
}

/// When `nodes` is given, it is the whole fleet: a pin outside it is a typo.
fn pins_are_declared(d: &Deployment, n: usize, spec: &ProcessSpec, out: &mut Vec<Finding>) {
    if d.nodes().is_empty() {
        return;
    }
    for (i, pin) in spec.pin().iter().enumerate() {
        if !d.nodes().contains(pin) {
            out.push(
                Finding::new(
                    Rule::UnknownPin,
                    Location::Item(n, Field::Pin, i),
                    format!("`pin` names node `{pin}`, which is not in `nodes`"),
                )
                .help(did_you_mean(
                    pin.as_str(),
                    d.nodes().iter().map(NodeName::as_str),
                )),
            );
        }
    }
}

/// A service name is its key in plans, `after` and process ids.
fn names_are_unique(d: &Deployment, out: &mut Vec<Finding>) {
    let mut first = BTreeMap::new();
    for (n, spec) in d.services().iter().enumerate() {
        if first.insert(spec.name(), n).is_some() {
            out.push(Finding::new(
                Rule::DuplicateService,
                Location::Service(n),
                format!("service `{}` is declared twice", spec.name()),
            ));
        }
    }
}

/// The root routes one domain to one process.
fn domains_are_unique(d: &Deployment, out: &mut Vec<Finding>) {
    let mut first: BTreeMap<String, &str> = BTreeMap::new();
    for (n, spec) in d.services().iter().enumerate() {
        if let Some(domain) = spec.domain() {
            if let Some(other) = first.get(&domain.to_ascii_lowercase()) {
                out.push(Finding::new(
                    Rule::DuplicateDomain,
                    Location::Field(n, Field::Domain),
                    format!("domain `{domain}` is already used by service `{other}`"),
                ));
            } else {
                first.insert(domain.to_ascii_lowercase(), spec.name());
            }
        }
    }
}

fn after_names_services(d: &Deployment, out: &mut Vec<Finding>) {
    let names: Vec<&str> = d.services().iter().map(ProcessSpec::name).collect();
    for (n, spec) in d.services().iter().enumerate() {
        for (i, dep) in spec.after().enumerate() {
            if !names.contains(&dep) {
                out.push(
                    Finding::new(
                        Rule::UnknownAfter,
                        Location::Item(n, Field::After, i),
                        format!("`after` names `{dep}`, which is not a service of this deployment"),
                    )
                    .help(did_you_mean(dep, names.iter().copied())),
                );
            }
        }
    }
}

/// A cycle in `after` means nothing can start first. Each cycle is reported once, at the edge
/// that closes it.
fn after_has_no_cycle(d: &Deployment, out: &mut Vec<Finding>) {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnStack,
        Done,
    }
    let services = d.services();
    let index = |name: &str| services.iter().position(|s| s.name() == name);
    let mut marks = vec![Mark::New; services.len()];
    for root in 0..services.len() {
        if marks[root] != Mark::New {
            continue;
        }
        // Iterative DFS: (service, next edge to look at).
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        marks[root] = Mark::OnStack;
        while let Some((n, edge)) = stack.last().copied() {
            let next = services[n].after().nth(edge);
            let Some(dep) = next else {
                marks[n] = Mark::Done;
                stack.pop();
                continue;
            };
            if let Some(top) = stack.last_mut() {
                top.1 += 1;
            }
            let Some(m) = index(dep) else { continue };
            match marks[m] {
                Mark::New => {
                    marks[m] = Mark::OnStack;
                    stack.push((m, 0));
                }
                Mark::OnStack => {
                    let start = stack.iter().position(|(s, _)| *s == m).unwrap_or(0);
                    let mut path: Vec<&str> = stack[start..]
                        .iter()
                        .map(|(s, _)| services[*s].name())
                        .collect();
                    path.push(services[m].name());
                    out.push(Finding::new(
                        Rule::AfterCycle,
                        Location::Item(n, Field::After, edge),
                        format!("`after` forms a cycle: {}", path.join(" → ")),
                    ));
                }
                Mark::Done => {}
            }
        }
    }
}

/// Two services with one port cannot share a node: the second would fail with `PortInUse`.
/// An unpinned service may run on any node, so it overlaps with everything.
fn ports_do_not_collide(d: &Deployment, out: &mut Vec<Finding>) {
    let services = d.services();
    for (j, b) in services.iter().enumerate() {
        let Some(port) = b.port() else { continue };
        let clash = services[..j].iter().find(|a| {
            a.port() == Some(port)
                && (a.pin().is_empty()
                    || b.pin().is_empty()
                    || a.pin().iter().any(|n| b.pin().contains(n)))
        });
        if let Some(a) = clash {
            let shared = if a.pin().is_empty() || b.pin().is_empty() {
                "an unpinned service may run on any node".to_owned()
            } else {
                let both: Vec<&str> = a
                    .pin()
                    .iter()
                    .filter(|n| b.pin().contains(n))
                    .map(NodeName::as_str)
                    .collect();
                format!("both may run on {}", both.join(", "))
            };
            out.push(
                Finding::new(
                    Rule::PortConflict,
                    Location::Field(j, Field::Port),
                    format!(
                        "port {port} is also used by service `{}` and {shared}",
                        a.name()
                    ),
                )
                .help(Some(
                    "use another port, or pin the two services to different nodes".into(),
                )),
            );
        }
    }
}

/// The root forwards a public port to one process: a second claim, in another service or the
/// same one, could only take it from the first. TCP and UDP ports of one number are two
/// ports. Reported at the second claim, naming the service of the first.
fn public_ports_are_unique(d: &Deployment, out: &mut Vec<Finding>) {
    let mut first: BTreeMap<(Protocol, u16), &str> = BTreeMap::new();
    for (n, spec) in d.services().iter().enumerate() {
        for (i, port) in spec.public().iter().enumerate() {
            // Port 0 is out of range, reported once by `single_spec`.
            if port.public() == 0 {
                continue;
            }
            let key = (port.protocol(), port.public());
            if let Some(other) = first.get(&key) {
                out.push(
                    Finding::new(
                        Rule::DuplicatePublicPort,
                        Location::Item(n, Field::Public, i),
                        format!(
                            "public {} port {} is already claimed by service `{other}`",
                            port.protocol(),
                            port.public()
                        ),
                    )
                    .help(Some(format!(
                        "pick another public port; `{}(PUBLIC => {})` still reaches port {} of the process",
                        port.protocol().kind(),
                        port.target(),
                        port.target()
                    ))),
                );
            } else {
                first.insert(key, spec.name());
            }
        }
    }
}

/// Rule: no public port of `d` is one the root itself holds. `reserved` lists those as
/// `(protocol, port, holder)`, the holder named in the message: [`INGRESS_PORTS`] at compile
/// time; at run time the root's configured ingress ports (and anything else it listens on).
///
/// Returns one [`Rule::ReservedPublicPort`] finding per clashing entry, at
/// `Location::Item(service, Field::Public, entry)`, in declaration order; empty when none
/// clashes. Pure: it looks at `d` and `reserved` only.
pub fn public_port_clashes(d: &Deployment, reserved: &[(Protocol, u16, &str)]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (n, spec) in d.services().iter().enumerate() {
        for (i, port) in spec.public().iter().enumerate() {
            let held = reserved.iter().find(|(protocol, number, _)| {
                *protocol == port.protocol() && *number == port.public()
            });
            if let Some((protocol, number, holder)) = held {
                out.push(
                    Finding::new(
                        Rule::ReservedPublicPort,
                        Location::Item(n, Field::Public, i),
                        format!("public {protocol} port {number} is the root's own: {holder} listens there"),
                    )
                    .help(Some(
                        "serve the service with `domain: \"..\"` through the ingress instead, or pick another public port"
                            .into(),
                    )),
                );
            }
        }
    }
    out
}
