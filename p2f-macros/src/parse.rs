//! Reading `deployment! { .. }` into the model. Syntax errors inside one field's value are
//! collected and the parser moves on to the next field, so one build reports them all.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use p2f_model::validate::{self, Field};
use p2f_model::{
    Bundle, BundleFile, DEFAULT_GRACE, EnvVar, Health, Location, NameError, NodeName, Protocol,
    PublicPort, RestartPolicy, SpecParts, Strategy, parse_duration,
};
use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::parse::{ParseStream, Parser};
use syn::{Ident, LitInt, LitStr, Token, braced, bracketed, parenthesized};

use crate::ast::{Input, Service};
use crate::embed;

/// Every error seen, merged into one.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub(crate) fn at(&mut self, anchor: impl ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(anchor, message));
    }

    pub(crate) fn has_any(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn into_error(self) -> Option<syn::Error> {
        self.0
    }
}

/// Parses the whole input. `Err` only when the structure itself is broken; errors inside
/// values are in `errors`.
pub(crate) fn input(tokens: TokenStream, errors: &mut Errors) -> syn::Result<Input> {
    let parser = |stream: ParseStream<'_>| parse_input(stream, errors);
    parser.parse2(tokens)
}

fn parse_input(input: ParseStream<'_>, errors: &mut Errors) -> syn::Result<Input> {
    let mut out = Input {
        nodes: Vec::new(),
        services: Vec::new(),
        anchors: HashMap::new(),
    };
    let mut seen_nodes = false;
    if input.is_empty() {
        return Err(input.error("a deployment needs at least one `service NAME { start: \"..\" }`"));
    }
    while !input.is_empty() {
        let keyword: Ident = input.parse().map_err(|e| {
            syn::Error::new(e.span(), "expected `nodes: [..]` or `service NAME { .. }`")
        })?;
        if keyword == "nodes" {
            if seen_nodes {
                errors.at(&keyword, "`nodes` is given twice");
            }
            if !out.services.is_empty() {
                errors.at(&keyword, "`nodes` must come before the first service");
            }
            seen_nodes = true;
            input.parse::<Token![:]>()?;
            let list;
            bracketed!(list in input);
            for (name, anchor) in node_list(&list)? {
                match name {
                    Ok(name) => {
                        out.anchors.insert(Location::Node(out.nodes.len()), anchor);
                        out.nodes.push(name);
                    }
                    Err(e) => errors.at(&anchor, e),
                }
            }
            if input.peek(Token![,]) {
                input.parse::<Token![,]>()?;
            }
        } else if keyword == "service" {
            let name: Ident = input.parse()?;
            let body;
            braced!(body in input);
            let n = out.services.len();
            out.anchors
                .insert(Location::Service(n), name.to_token_stream());
            let service = service(n, &name, &body, errors, &mut out.anchors)?;
            out.services.push(service);
            if input.peek(Token![,]) || input.peek(Token![;]) {
                input.parse::<TokenTree>()?;
            }
        } else {
            let hint = validate::did_you_mean(&keyword.to_string(), ["nodes", "service"])
                .unwrap_or_else(|| {
                    "a deployment is `nodes: [..]` and `service NAME { .. }` blocks".into()
                });
            return Err(syn::Error::new(
                keyword.span(),
                format!("expected `nodes` or `service`, found `{keyword}`; {hint}"),
            ));
        }
    }
    Ok(out)
}

/// A node name: an identifier or a string literal (P2PRC names may hold '-' and '.').
fn node_name(input: ParseStream<'_>) -> syn::Result<(String, TokenStream)> {
    if input.peek(LitStr) {
        let lit: LitStr = input.parse()?;
        Ok((lit.value(), lit.to_token_stream()))
    } else if input.peek(Ident) {
        let ident: Ident = input.parse()?;
        Ok((ident.to_string(), ident.to_token_stream()))
    } else {
        Err(input.error("expected a node name: an identifier or a \"string literal\""))
    }
}

/// `[NODE, ..]`, each name checked against the naming rule.
fn node_list(
    list: ParseStream<'_>,
) -> syn::Result<Vec<(Result<NodeName, NameError>, TokenStream)>> {
    let mut out = Vec::new();
    while !list.is_empty() {
        let (text, anchor) = node_name(list)?;
        out.push((NodeName::new(text), anchor));
        if list.is_empty() {
            break;
        }
        list.parse::<Token![,]>()?;
    }
    Ok(out)
}

/// Parses a service block into `SpecParts`, defaults filled in.
fn service(
    n: usize,
    name: &Ident,
    body: ParseStream<'_>,
    errors: &mut Errors,
    anchors: &mut HashMap<Location, TokenStream>,
) -> syn::Result<Service> {
    let mut parts = SpecParts {
        name: Cow::Owned(name.to_string()),
        start: Cow::Borrowed(""),
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
    };
    let mut given = BTreeSet::new();
    let mut poisoned = BTreeSet::new();
    // Fields that a misspelled field name was probably meant to be.
    let mut guessed = BTreeSet::new();
    while !body.is_empty() {
        let field_name: Ident = body.parse()?;
        body.parse::<Token![:]>()?;
        let mut value = TokenStream::new();
        while !body.is_empty() && !body.peek(Token![,]) {
            value.extend([body.parse::<TokenTree>()?]);
        }
        if !body.is_empty() {
            body.parse::<Token![,]>()?;
        }
        let Some(field) = Field::from_name(&field_name.to_string()) else {
            let text = field_name.to_string();
            errors.at(&field_name, validate::unknown_field(&text, n));
            guessed.extend(
                Field::ALL
                    .into_iter()
                    .filter(|f| validate::did_you_mean(&text, [f.name()]).is_some()),
            );
            continue;
        };
        if !given.insert(field) {
            errors.at(
                &field_name,
                format!("duplicate field `{field}`: it is already given in this service"),
            );
            continue;
        }
        if value.is_empty() {
            errors.at(&field_name, format!("`{field}` needs a value"));
            poisoned.insert(field);
            continue;
        }
        anchors.insert(Location::Field(n, field), value.clone());
        let mut cx = FieldCx {
            n,
            field,
            anchors: &mut *anchors,
        };
        let result = (|stream: ParseStream<'_>| cx.value(stream, &mut parts)).parse2(value);
        if let Err(e) = result {
            errors.push(e);
            poisoned.insert(field);
        }
    }
    // `strat: ".."` is reported as an unknown field, not also as a missing `start`.
    poisoned.extend(guessed.difference(&given));
    let (embeds, resolved) = embed::strategy_files(&parts.strategy);
    // The shared rules see a script's or playbook's bytes (its line ends, a byte-order mark);
    // a flake directory's files only as names. The expansion embeds them with `include_bytes!`.
    let read_contents = matches!(parts.strategy, Strategy::Script(_) | Strategy::Ansible(_));
    let files: Vec<BundleFile> = embeds
        .iter()
        .map(|(path, disk)| {
            let contents = if read_contents {
                std::fs::read(disk).unwrap_or_default()
            } else {
                Vec::new()
            };
            BundleFile::owned(path.clone(), contents)
        })
        .collect();
    parts.bundle = Bundle::owned(files);
    Ok(Service {
        parts,
        given,
        poisoned,
        embeds,
        resolved,
    })
}

/// Parses one field's value.
struct FieldCx<'a> {
    n: usize,
    field: Field,
    anchors: &'a mut HashMap<Location, TokenStream>,
}

impl FieldCx<'_> {
    fn value(&mut self, input: ParseStream<'_>, parts: &mut SpecParts) -> syn::Result<()> {
        match self.field {
            Field::Start => {
                parts.start = Cow::Owned(string(
                    input,
                    "the command to run, e.g. \"python3 -m http.server $PORT\"",
                )?)
            }
            Field::Stop => {
                parts.stop = Some(Cow::Owned(string(input, "the command that stops it")?))
            }
            Field::Domain => {
                parts.domain = Some(Cow::Owned(string(
                    input,
                    "a domain name, e.g. \"wiki.home.arpa\"",
                )?))
            }
            Field::User => parts.user = Some(Cow::Owned(string(input, "an OS user name")?)),
            Field::Port => parts.port = Some(port(input, validate::port)?),
            Field::Public => parts.public = Cow::Owned(self.public(input)?),
            Field::Strategy => parts.strategy = self.strategy(input)?,
            Field::Health => parts.health = Some(health(input)?),
            Field::Restart => parts.restart = restart(input)?,
            Field::Grace => parts.grace = grace(input)?,
            Field::Pin => {
                let list;
                bracketed!(list in input);
                let mut pins = Vec::new();
                let mut bad = Errors::default();
                for (i, (name, anchor)) in node_list(&list)?.into_iter().enumerate() {
                    match name {
                        Ok(name) => pins.push(name),
                        Err(e) => bad.at(&anchor, e),
                    }
                    self.anchors
                        .insert(Location::Item(self.n, Field::Pin, i), anchor);
                }
                if let Some(error) = bad.into_error() {
                    return Err(error);
                }
                parts.pin = Cow::Owned(pins);
            }
            Field::After => {
                let list;
                bracketed!(list in input);
                let mut after = Vec::new();
                while !list.is_empty() {
                    let ident: Ident = list.parse().map_err(|e| {
                        syn::Error::new(
                            e.span(),
                            "expected the name of a service of this deployment",
                        )
                    })?;
                    self.anchors.insert(
                        Location::Item(self.n, Field::After, after.len()),
                        ident.to_token_stream(),
                    );
                    after.push(Cow::Owned(ident.to_string()));
                    if list.is_empty() {
                        break;
                    }
                    list.parse::<Token![,]>()?;
                }
                parts.after = Cow::Owned(after);
            }
            Field::Env => {
                let map;
                braced!(map in input);
                let mut env = Vec::new();
                while !map.is_empty() {
                    let (key, anchor) = if map.peek(LitStr) {
                        let lit: LitStr = map.parse()?;
                        (lit.value(), lit.to_token_stream())
                    } else {
                        let ident: Ident = map
                            .parse()
                            .map_err(|e| syn::Error::new(e.span(), "expected a variable name"))?;
                        (ident.to_string(), ident.to_token_stream())
                    };
                    map.parse::<Token![:]>()?;
                    let value = string(&map, "the variable's value")?;
                    self.anchors
                        .insert(Location::Item(self.n, Field::Env, env.len()), anchor);
                    env.push(EnvVar::owned(key, value));
                    if map.is_empty() {
                        break;
                    }
                    map.parse::<Token![,]>()?;
                }
                parts.env = Cow::Owned(env);
            }
        }
        if !input.is_empty() {
            return Err(input.error(format!(
                "unexpected tokens after the value of `{}`: separate fields with `,`",
                self.field
            )));
        }
        Ok(())
    }

    /// `[Tcp(N), Udp(N), Tcp(PUBLIC => TARGET), ..]`, each entry's tokens kept as its anchor.
    /// Every bad entry is reported, then the field as a whole is rejected.
    fn public(&mut self, input: ParseStream<'_>) -> syn::Result<Vec<PublicPort>> {
        let list;
        bracketed!(list in input);
        let mut ports = Vec::new();
        let mut bad = Errors::default();
        let mut i = 0;
        while !list.is_empty() {
            let mut entry = TokenStream::new();
            while !list.is_empty() && !list.peek(Token![,]) {
                entry.extend([list.parse::<TokenTree>()?]);
            }
            if entry.is_empty() {
                return Err(list.error("expected a public port before `,`"));
            }
            match public_port.parse2(entry.clone()) {
                Ok(port) => ports.push(port),
                Err(e) => bad.push(e),
            }
            self.anchors
                .insert(Location::Item(self.n, Field::Public, i), entry);
            i += 1;
            if list.is_empty() {
                break;
            }
            list.parse::<Token![,]>()?;
        }
        match bad.into_error() {
            Some(error) => Err(error),
            None => Ok(ports),
        }
    }

    /// `Shell | Script("file") | Nix("installable") | Ansible("playbook") | Custom("command")`.
    fn strategy(&mut self, input: ParseStream<'_>) -> syn::Result<Strategy> {
        let (kind, arg) = variant(
            input,
            &["Shell", "Script", "Nix", "Ansible", "Custom"],
            "a strategy",
        )?;
        let needs_arg = |what: &str| -> syn::Result<(String, TokenStream)> {
            arg.clone().ok_or_else(|| {
                syn::Error::new(
                    kind.span(),
                    format!("`{kind}` needs {what}, e.g. `{kind}(\"..\")`"),
                )
            })
        };
        let mut text = |(s, anchor): (String, TokenStream)| {
            self.anchors
                .insert(Location::Field(self.n, Field::Strategy), anchor);
            Cow::Owned(s)
        };
        Ok(match kind.to_string().as_str() {
            "Shell" => no_arg(&kind, arg.as_ref(), Strategy::Shell)?,
            "Script" => Strategy::Script(text(needs_arg("a script file")?)),
            "Nix" => Strategy::Nix(text(needs_arg("a flake installable or directory")?)),
            "Ansible" => Strategy::Ansible(text(needs_arg("a playbook file")?)),
            _ => Strategy::Custom(text(needs_arg("a deploy command")?)),
        })
    }
}

/// A string literal, or an error saying what was expected.
fn string(input: ParseStream<'_>, what: &str) -> syn::Result<String> {
    if input.peek(LitStr) {
        Ok(input.parse::<LitStr>()?.value())
    } else {
        Err(not_a_literal(input, &format!("a string literal: {what}")))
    }
}

fn not_a_literal(input: ParseStream<'_>, what: &str) -> syn::Error {
    let rest: TokenStream = input.parse().unwrap_or_default();
    if rest.is_empty() {
        input.error(format!("expected {what}"))
    } else {
        syn::Error::new_spanned(
            rest,
            format!("expected {what}; the value must be written out here, not computed"),
        )
    }
}

/// A port number, in the range `check` allows (`1..=65535`).
fn port(input: ParseStream<'_>, check: fn(u64) -> Result<u16, String>) -> syn::Result<u16> {
    if input.peek(LitStr) {
        return Err(input.error("expected an integer literal 1..=65535, not a string"));
    }
    if !input.peek(LitInt) {
        return Err(not_a_literal(input, "an integer literal 1..=65535"));
    }
    let lit: LitInt = input.parse()?;
    if !lit.suffix().is_empty() {
        return Err(syn::Error::new(
            lit.span(),
            "write the port without a suffix, e.g. `8080`",
        ));
    }
    let n: u64 = lit.base10_parse().unwrap_or(u64::MAX);
    check(n).map_err(|e| syn::Error::new(lit.span(), e))
}

/// One public port: `Tcp(N)`, `Udp(N)` (public N → the process's N), or `Tcp(PUBLIC =>
/// TARGET)`.
fn public_port(input: ParseStream<'_>) -> syn::Result<PublicPort> {
    const NAMES: [&str; 2] = ["Tcp", "Udp"];
    let kind: Ident = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "expected a public port: `Tcp(N)`, `Udp(N)` or `Tcp(PUBLIC => TARGET)`",
        )
    })?;
    let protocol = match kind.to_string().as_str() {
        "Tcp" => Protocol::Tcp,
        "Udp" => Protocol::Udp,
        other => return Err(unknown_variant(&kind, other, &NAMES, "a protocol")),
    };
    if !input.peek(syn::token::Paren) {
        return Err(syn::Error::new(
            kind.span(),
            format!("`{kind}` needs a port, e.g. `{kind}(25565)` or `{kind}(8022 => 22)`"),
        ));
    }
    let args;
    parenthesized!(args in input);
    let public = port(&args, validate::public_port)?;
    let target = if args.peek(Token![=>]) {
        args.parse::<Token![=>]>()?;
        port(&args, validate::public_port)?
    } else {
        public
    };
    if !args.is_empty() {
        return Err(args.error(format!(
            "expected `)`: a public port is `{kind}(N)` or `{kind}(PUBLIC => TARGET)`"
        )));
    }
    if !input.is_empty() {
        return Err(input.error("expected `,` between public ports"));
    }
    Ok(PublicPort::new(protocol, public, target))
}

/// `500ms`, `10s`, `2m`, `1h` (or the same in a string literal).
fn grace(input: ParseStream<'_>) -> syn::Result<std::time::Duration> {
    let token: TokenTree = input
        .parse()
        .map_err(|e| syn::Error::new(e.span(), "expected a duration such as `10s`"))?;
    let text = match &token {
        TokenTree::Literal(lit) => {
            let raw = lit.to_string();
            match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                Some(inner) => inner.to_owned(),
                None => raw.replace('_', ""),
            }
        }
        other => {
            return Err(syn::Error::new_spanned(
                other,
                "expected a duration literal such as `500ms`, `10s`, `2m` or `1h`",
            ));
        }
    };
    parse_duration(&text).map_err(|e| syn::Error::new(token.span(), e))
}

/// `Tcp | Http("/path") | Cmd("command") | None`.
fn health(input: ParseStream<'_>) -> syn::Result<Health> {
    let (kind, arg) = variant(input, &["Tcp", "Http", "Cmd", "None"], "a health check")?;
    let needs = |what: &str| {
        arg.clone()
            .map(|(s, _)| Cow::Owned(s))
            .ok_or_else(|| syn::Error::new(kind.span(), format!("`{kind}` needs {what}")))
    };
    Ok(match kind.to_string().as_str() {
        "Tcp" => no_arg(&kind, arg.as_ref(), Health::Tcp)?,
        "None" => no_arg(&kind, arg.as_ref(), Health::None)?,
        "Http" => Health::Http(needs("a path, e.g. `Http(\"/\")`")?),
        _ => Health::Cmd(needs("a command, e.g. `Cmd(\"curl -f localhost:$PORT\")`")?),
    })
}

/// `Always | OnFailure(N) | Never`.
fn restart(input: ParseStream<'_>) -> syn::Result<RestartPolicy> {
    let kind: Ident = input
        .parse()
        .map_err(|e| syn::Error::new(e.span(), "expected `Always`, `OnFailure(N)` or `Never`"))?;
    match kind.to_string().as_str() {
        "Always" => Ok(RestartPolicy::Always),
        "Never" => Ok(RestartPolicy::Never),
        "OnFailure" => {
            if !input.peek(syn::token::Paren) {
                return Err(syn::Error::new(
                    kind.span(),
                    "`OnFailure` needs a count, e.g. `OnFailure(5)`",
                ));
            }
            let args;
            parenthesized!(args in input);
            let lit: LitInt = args
                .parse()
                .map_err(|e| syn::Error::new(e.span(), "expected a count, e.g. `OnFailure(5)`"))?;
            lit.base10_parse::<u32>().map(RestartPolicy::OnFailure)
        }
        other => Err(unknown_variant(
            &kind,
            other,
            &["Always", "OnFailure", "Never"],
            "a restart policy",
        )),
    }
}

/// `Name` or `Name("text")`, where `Name` is one of `names`.
fn variant(
    input: ParseStream<'_>,
    names: &[&str],
    what: &str,
) -> syn::Result<(Ident, Option<(String, TokenStream)>)> {
    let kind: Ident = input.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            format!("expected {what}: one of {}", names.join(", ")),
        )
    })?;
    if !names.contains(&kind.to_string().as_str()) {
        return Err(unknown_variant(&kind, &kind.to_string(), names, what));
    }
    if !input.peek(syn::token::Paren) {
        return Ok((kind, None));
    }
    let args;
    parenthesized!(args in input);
    if !args.peek(LitStr) {
        return Err(not_a_literal(&args, "a string literal"));
    }
    let lit: LitStr = args.parse()?;
    if !args.is_empty() {
        return Err(args.error("expected one string literal"));
    }
    Ok((kind, Some((lit.value(), lit.to_token_stream()))))
}

fn no_arg<T>(kind: &Ident, arg: Option<&(String, TokenStream)>, value: T) -> syn::Result<T> {
    match arg {
        Some((_, anchor)) => Err(syn::Error::new_spanned(
            anchor,
            format!("`{kind}` takes no argument"),
        )),
        None => Ok(value),
    }
}

fn unknown_variant(kind: &Ident, text: &str, names: &[&str], what: &str) -> syn::Error {
    let hint = validate::did_you_mean(text, names.iter().copied())
        .unwrap_or_else(|| format!("expected one of {}", names.join(", ")));
    syn::Error::new(kind.span(), format!("`{text}` is not {what}; {hint}"))
}
