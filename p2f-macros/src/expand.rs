//! Writes the `const`-evaluable `Deployment`: public constructors only (anything the macro writes,
//! a user could write by hand), every slice in a named `const` so it lives for `'static`.

use p2f_model::{Health, RestartPolicy, SpecParts, Strategy};
use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote};

use crate::ast::{Input, Service};
use crate::{check, embed};
use crate::parse::{self, Errors};

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
    if errors_present(&errors) {
        return stub(errors);
    }
    expand(&input)
}

fn errors_present(errors: &Errors) -> bool {
    errors.has_any()
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
    let mut consts = Vec::new();
    let services: Vec<TokenStream> = input
        .services
        .iter()
        .enumerate()
        .map(|(n, s)| service(n, s, &mut consts))
        .collect();
    let nodes = input.nodes.iter().map(|node| {
        let name = node.as_str();
        quote!(::p2f::model::NodeName::from_static(#name))
    });
    quote!({
        #(#consts)*
        const __P2F_NODES: &[::p2f::model::NodeName] = &[#(#nodes),*];
        const __P2F_SERVICES: &[::p2f::model::ProcessSpec] = &[#(#services),*];
        ::p2f::model::Deployment::new(__P2F_NODES, __P2F_SERVICES)
    })
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
    quote!(::std::borrow::Cow::Borrowed(#text))
}

fn opt(text: Option<&str>) -> TokenStream {
    match text {
        Some(t) => {
            let c = cow(t);
            quote!(::core::option::Option::Some(#c))
        }
        None => quote!(::core::option::Option::None),
    }
}

/// A `const NAME: &[ty] = &[items];` and the tokens that borrow it.
fn slice_const(
    consts: &mut Vec<TokenStream>,
    name: Ident,
    ty: TokenStream,
    items: Vec<TokenStream>,
) -> TokenStream {
    if items.is_empty() {
        return quote!(::std::borrow::Cow::Borrowed(&[]));
    }
    consts.push(quote!(const #name: &[#ty] = &[#(#items),*];));
    quote!(::std::borrow::Cow::Borrowed(#name))
}

fn service(n: usize, service: &Service, consts: &mut Vec<TokenStream>) -> TokenStream {
    let SpecParts {
        name,
        start,
        stop,
        port,
        strategy,
        domain,
        pin,
        after,
        health,
        restart,
        grace,
        env,
        user,
        bundle: _,
    } = &service.parts;
    let ident = |what: &str| format_ident!("__P2F_{}_{}", what, n, span = Span::call_site());
    let name = cow(name);
    let start = cow(start);
    let stop = opt(stop.as_deref());
    let domain = opt(domain.as_deref());
    let user = opt(user.as_deref());
    let port = match port {
        Some(p) => quote!(::core::option::Option::Some(#p)),
        None => quote!(::core::option::Option::None),
    };
    let strategy = match strategy {
        Strategy::Shell => quote!(::p2f::model::Strategy::Shell),
        Strategy::Script(p) => {
            let c = cow(p);
            quote!(::p2f::model::Strategy::Script(#c))
        }
        Strategy::Nix(p) => {
            let c = cow(p);
            quote!(::p2f::model::Strategy::Nix(#c))
        }
        Strategy::Ansible(p) => {
            let c = cow(p);
            quote!(::p2f::model::Strategy::Ansible(#c))
        }
        Strategy::Custom(p) => {
            let c = cow(p);
            quote!(::p2f::model::Strategy::Custom(#c))
        }
    };
    let health = match health {
        None => quote!(::core::option::Option::None),
        Some(h) => {
            let h = match h {
                Health::Tcp => quote!(::p2f::model::Health::Tcp),
                Health::Http(p) => {
                    let c = cow(p);
                    quote!(::p2f::model::Health::Http(#c))
                }
                Health::Cmd(p) => {
                    let c = cow(p);
                    quote!(::p2f::model::Health::Cmd(#c))
                }
                Health::None => quote!(::p2f::model::Health::None),
            };
            quote!(::core::option::Option::Some(#h))
        }
    };
    let restart = match restart {
        RestartPolicy::Always => quote!(::p2f::model::RestartPolicy::Always),
        RestartPolicy::OnFailure(k) => quote!(::p2f::model::RestartPolicy::OnFailure(#k)),
        RestartPolicy::Never => quote!(::p2f::model::RestartPolicy::Never),
    };
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let pin_items = pin
        .iter()
        .map(|p| {
            let s = p.as_str();
            quote!(::p2f::model::NodeName::from_static(#s))
        })
        .collect();
    let pin = slice_const(
        consts,
        ident("PIN"),
        quote!(::p2f::model::NodeName),
        pin_items,
    );
    let after_items = after.iter().map(|a| cow(a)).collect();
    let after = slice_const(
        consts,
        ident("AFTER"),
        quote!(::std::borrow::Cow<'static, str>),
        after_items,
    );
    let env_items = env
        .iter()
        .map(|v| {
            let (k, val) = (v.name(), v.value());
            quote!(::p2f::model::EnvVar::new(#k, #val))
        })
        .collect();
    let env = slice_const(
        consts,
        ident("ENV"),
        quote!(::p2f::model::EnvVar),
        env_items,
    );
    let files: Vec<TokenStream> = service
        .embeds
        .iter()
        .map(|(path, disk)| {
            let bytes = include_path(disk);
            quote!(::p2f::model::BundleFile::new(#path, ::core::include_bytes!(#bytes)))
        })
        .collect();
    let bundle = if files.is_empty() {
        quote!(::p2f::model::Bundle::EMPTY)
    } else {
        let files_name = ident("BUNDLE");
        consts.push(quote!(const #files_name: &[::p2f::model::BundleFile] = &[#(#files),*];));
        quote!(::p2f::model::Bundle::from_static(#files_name))
    };
    quote!(::p2f::model::ProcessSpec::from_parts(::p2f::model::SpecParts {
        name: #name,
        start: #start,
        stop: #stop,
        port: #port,
        strategy: #strategy,
        domain: #domain,
        pin: #pin,
        after: #after,
        health: #health,
        restart: #restart,
        grace: ::core::time::Duration::from_millis(#grace_ms),
        env: #env,
        user: #user,
        bundle: #bundle,
    }))
}
