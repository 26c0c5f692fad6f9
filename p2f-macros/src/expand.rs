//! Writes the `const`-evaluable `Deployment`: public constructors only (anything the macro writes,
//! a user could write by hand), every slice in a named `const` so it lives for `'static`.
//!
//! The expansion is kept small, because its size is most of the macro's build cost (every token
//! crosses the proc-macro bridge and is parsed, resolved and type-checked again by rustc): paths
//! are imported once under `__p2f`/`__B`/`__S`/`__N` aliases, each service is one call of a local
//! `const fn __spec(..)` (which builds `ProcessSpec::from_parts(SpecParts { .. })`) with its
//! fields in `SpecParts` order, and equal slices (`public`, `pin`, `after`, `env`, bundle files)
//! share one named `const`. See BENCHMARKS.md, "deployment! build cost".
//!
//! `public` is the exception to that order: `__spec` takes it as its last parameter, and only
//! when some service of the deployment has public ports (otherwise it writes `public: __B(&[])`
//! itself), so a deployment without them costs no token more per service.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use p2f_model::{Health, Protocol, RestartPolicy, SpecParts, Strategy};
use proc_macro2::{Ident, Span, TokenStream};
use quote::{ToTokens, format_ident, quote};

use crate::ast::{Input, Service};
use crate::parse::{self, Errors};
use crate::{check, embed};

/// The whole macro: parse, check, expand; on error, the errors and a stub of the right type.
pub(crate) fn deployment(tokens: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let input = match parse::input(tokens, &mut errors) {
        Ok(input) => input,
        Err(e) => {
            errors.push(e);
            return stub(errors);
        }
    };
    check::check(&input, &mut errors);
    if errors.has_any() {
        return stub(errors);
    }
    expand(&input)
}

/// The errors, then an empty deployment so that the user's `const` still type-checks and no
/// second error follows from the first.
fn stub(errors: Errors) -> TokenStream {
    let errors = errors.into_error().map(|e| e.into_compile_error());
    quote!({
        #errors
        ::p2f::model::Deployment::new(&[], &[])
    })
}

fn expand(input: &Input) -> TokenStream {
    let mut consts = Consts::default();
    let with_public = input.services.iter().any(|s| !s.parts.public.is_empty());
    let services: Vec<TokenStream> = input
        .services
        .iter()
        .map(|s| service(s, with_public, &mut consts))
        .collect();
    let (public_param, public) = if with_public {
        (
            quote!(public: &'static [__p2f::PublicPort],),
            quote!(__B(public)),
        )
    } else {
        (TokenStream::new(), quote!(__B(&[])))
    };
    let nodes = input.nodes.iter().map(|node| {
        let name = node.as_str();
        quote!(__p2f::NodeName::from_static(#name))
    });
    let consts = consts.items;
    quote!({
        use ::p2f::model as __p2f;
        use ::std::borrow::Cow::Borrowed as __B;
        use ::core::option::Option::{None as __N, Some as __S};
        const fn __text(
            text: ::core::option::Option<&'static str>,
        ) -> ::core::option::Option<::std::borrow::Cow<'static, str>> {
            match text {
                __S(text) => __S(__B(text)),
                __N => __N,
            }
        }
        #[allow(clippy::too_many_arguments)]
        const fn __spec(
            name: &'static str,
            start: &'static str,
            stop: ::core::option::Option<&'static str>,
            port: ::core::option::Option<u16>,
            strategy: __p2f::Strategy,
            domain: ::core::option::Option<&'static str>,
            pin: &'static [__p2f::NodeName],
            after: &'static [::std::borrow::Cow<'static, str>],
            health: ::core::option::Option<__p2f::Health>,
            restart: __p2f::RestartPolicy,
            grace_ms: u64,
            env: &'static [__p2f::EnvVar],
            user: ::core::option::Option<&'static str>,
            bundle: &'static [__p2f::BundleFile],
            #public_param
        ) -> __p2f::ProcessSpec {
            __p2f::ProcessSpec::from_parts(__p2f::SpecParts {
                name: __B(name),
                start: __B(start),
                stop: __text(stop),
                port,
                strategy,
                domain: __text(domain),
                public: #public,
                pin: __B(pin),
                after: __B(after),
                health,
                restart,
                grace: ::core::time::Duration::from_millis(grace_ms),
                env: __B(env),
                user: __text(user),
                bundle: __p2f::Bundle::from_static(bundle),
            })
        }
        #(#consts)*
        const __P2F_NODES: &[__p2f::NodeName] = &[#(#nodes),*];
        const __P2F_SERVICES: &[__p2f::ProcessSpec] = &[#(#services),*];
        __p2f::Deployment::new(__P2F_NODES, __P2F_SERVICES)
    })
}

/// The named `const` slices of the expansion, one per distinct content.
#[derive(Default)]
struct Consts {
    items: Vec<TokenStream>,
    names: HashMap<(&'static str, Vec<String>), Ident>,
}

impl Consts {
    /// `&[]` when `key` is empty, else the name of the `const NAME: &[ty] = &[items];` for this
    /// content (`key` lists the texts that make up `items`), written the first time it is seen.
    fn slice(
        &mut self,
        what: &'static str,
        key: Vec<String>,
        ty: TokenStream,
        items: impl FnOnce() -> Vec<TokenStream>,
    ) -> TokenStream {
        if key.is_empty() {
            return quote!(&[]);
        }
        let name = match self.names.entry((what, key)) {
            Entry::Occupied(known) => known.get().clone(),
            Entry::Vacant(new) => {
                let name = format_ident!(
                    "__P2F_{}_{}",
                    what,
                    self.items.len(),
                    span = Span::call_site()
                );
                let items = items();
                self.items
                    .push(quote!(const #name: &[#ty] = &[#(#items),*];));
                new.insert(name).clone()
            }
        };
        name.into_token_stream()
    }
}

fn texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    texts.into_iter().map(str::to_owned).collect()
}

/// The path `include_bytes!` reads: relative to the crate's manifest when it lies inside it,
/// so the expansion holds no machine-specific path.
fn include_path(disk: &std::path::Path) -> TokenStream {
    match disk.strip_prefix(embed::manifest_dir()) {
        Ok(rel) => {
            let rel = format!("/{}", rel.to_string_lossy());
            quote!(::core::concat!(::core::env!("CARGO_MANIFEST_DIR"), #rel))
        }
        Err(_) => {
            let abs = disk.to_string_lossy();
            quote!(#abs)
        }
    }
}

fn cow(text: &str) -> TokenStream {
    quote!(__B(#text))
}

fn opt(text: Option<&str>) -> TokenStream {
    match text {
        Some(t) => quote!(__S(#t)),
        None => quote!(__N),
    }
}

/// One service: `__spec(..)` with the fields of `SpecParts` in order (`public` last, and only
/// `with_public`: when `__spec` takes it).
///
/// Longer than 100 lines on purpose: it is one `quote!` arm per field and per variant of
/// `Strategy`, `Health` and `RestartPolicy`, read top to bottom against `SpecParts`; split up,
/// the order that must match `__spec`'s parameters would no longer be visible in one place.
fn service(service: &Service, with_public: bool, consts: &mut Consts) -> TokenStream {
    let SpecParts {
        name,
        start,
        stop,
        port,
        strategy,
        domain,
        public,
        pin,
        after,
        health,
        restart,
        grace,
        env,
        user,
        bundle: _,
    } = &service.parts;
    let (name, start): (&str, &str) = (name, start);
    let stop = opt(stop.as_deref());
    let domain = opt(domain.as_deref());
    let user = opt(user.as_deref());
    let port = match port {
        Some(p) => quote!(__S(#p)),
        None => quote!(__N),
    };
    let strategy = match strategy {
        Strategy::Shell => quote!(__p2f::Strategy::Shell),
        Strategy::Script(p) => {
            let c = cow(p);
            quote!(__p2f::Strategy::Script(#c))
        }
        Strategy::Nix(p) => {
            let c = cow(p);
            quote!(__p2f::Strategy::Nix(#c))
        }
        Strategy::Ansible(p) => {
            let c = cow(p);
            quote!(__p2f::Strategy::Ansible(#c))
        }
        Strategy::Custom(p) => {
            let c = cow(p);
            quote!(__p2f::Strategy::Custom(#c))
        }
    };
    let health = match health {
        None => quote!(__N),
        Some(h) => {
            let h = match h {
                Health::Tcp => quote!(__p2f::Health::Tcp),
                Health::Http(p) => {
                    let c = cow(p);
                    quote!(__p2f::Health::Http(#c))
                }
                Health::Cmd(p) => {
                    let c = cow(p);
                    quote!(__p2f::Health::Cmd(#c))
                }
                Health::None => quote!(__p2f::Health::None),
            };
            quote!(__S(#h))
        }
    };
    let restart = match restart {
        RestartPolicy::Always => quote!(__p2f::RestartPolicy::Always),
        RestartPolicy::OnFailure(k) => quote!(__p2f::RestartPolicy::OnFailure(#k)),
        RestartPolicy::Never => quote!(__p2f::RestartPolicy::Never),
    };
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let pin = consts.slice(
        "PIN",
        texts(pin.iter().map(|p| p.as_str())),
        quote!(__p2f::NodeName),
        || {
            pin.iter()
                .map(|p| {
                    let s = p.as_str();
                    quote!(__p2f::NodeName::from_static(#s))
                })
                .collect()
        },
    );
    let after = consts.slice(
        "AFTER",
        texts(after.iter().map(|a| &**a)),
        quote!(::std::borrow::Cow<'static, str>),
        || after.iter().map(|a| cow(a)).collect(),
    );
    let env = consts.slice(
        "ENV",
        texts(env.iter().flat_map(|v| [v.name(), v.value()])),
        quote!(__p2f::EnvVar),
        || {
            env.iter()
                .map(|v| {
                    let (k, val) = (v.name(), v.value());
                    quote!(__p2f::EnvVar::new(#k, #val))
                })
                .collect()
        },
    );
    let bundle = consts.slice(
        "BUNDLE",
        service
            .embeds
            .iter()
            .flat_map(|(path, disk)| [path.clone(), disk.to_string_lossy().into_owned()])
            .collect(),
        quote!(__p2f::BundleFile),
        || {
            service
                .embeds
                .iter()
                .map(|(path, disk)| {
                    let bytes = include_path(disk);
                    quote!(__p2f::BundleFile::new(#path, ::core::include_bytes!(#bytes)))
                })
                .collect()
        },
    );
    let public = with_public.then(|| {
        let slice = consts.slice(
            "PUBLIC",
            public
                .iter()
                .map(|p| format!("{}:{}:{}", p.protocol(), p.public(), p.target()))
                .collect(),
            quote!(__p2f::PublicPort),
            || {
                public
                    .iter()
                    .map(|p| {
                        let protocol = match p.protocol() {
                            Protocol::Tcp => quote!(__p2f::Protocol::Tcp),
                            Protocol::Udp => quote!(__p2f::Protocol::Udp),
                        };
                        let (from, to) = (p.public(), p.target());
                        quote!(__p2f::PublicPort::new(#protocol, #from, #to))
                    })
                    .collect()
            },
        );
        quote!(, #slice)
    });
    quote!(__spec(
        #name, #start, #stop, #port, #strategy, #domain, #pin, #after, #health, #restart,
        #grace_ms, #env, #user, #bundle #public
    ))
}
