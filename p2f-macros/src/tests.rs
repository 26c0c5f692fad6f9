//! Expansion snapshots: what `deployment!` writes for representative inputs, pretty-printed.
//! Review a changed snapshot like code: it is the macro's output.

use proc_macro2::TokenStream;
use quote::quote;

/// The expansion as a `const` item, formatted by prettyplease.
fn expand(input: TokenStream) -> String {
    let expr = crate::expand::deployment(input);
    let file = quote!(const HOME: ::p2f::model::Deployment = #expr;);
    match syn::parse2::<syn::File>(file) {
        Ok(file) => prettyplease::unparse(&file),
        Err(e) => format!("expansion does not parse: {e}"),
    }
}

#[test]
fn minimal_service() {
    insta::assert_snapshot!(expand(quote! {
        service wiki { start: "python3 -m http.server $PORT", port: 8080 }
    }));
}

#[test]
fn every_field() {
    insta::assert_snapshot!(expand(quote! {
        nodes: [laptop, "homelaptop-Xk3Pq9Z"],
        service db { start: "postgres", port: 5432, pin: [laptop] }
        service wiki {
            start: "python3 -m http.server $PORT",
            stop: "kill -INT $PID",
            port: 8080,
            strategy: Custom("pip install --user wiki"),
            domain: "wiki.home.arpa",
            pin: [laptop, "homelaptop-Xk3Pq9Z"],
            after: [db],
            health: Http("/"),
            restart: OnFailure(3),
            grace: 500ms,
            env: { MODE: "home", "LANG": "C" },
            user: "wiki",
        }
    }));
}

#[test]
fn public_ports() {
    // `__spec` takes `public` only because a service has some; equal lists share a `const`.
    insta::assert_snapshot!(expand(quote! {
        service mc { start: "java -jar server.jar", port: 25565, public: [Tcp(25565), Udp(19132)] }
        service ssh { start: "sshd -D", public: [Tcp(8022 => 22)] }
        service worker { start: "sleep infinity" }
    }));
}

#[test]
fn embedded_files() {
    // Resolved against this crate's manifest directory, as for a user's crate.
    insta::assert_snapshot!(expand(quote! {
        service backup { strategy: Script("../examples/deploy/backup.sh"), start: "sleep 60" }
        service notes { strategy: Nix("../examples/deploy/notes"), start: "$P2F_NIX_OUT/bin/notes" }
    }));
}

#[test]
fn errors_expand_to_a_stub() {
    insta::assert_snapshot!(expand(quote! {
        service wiki { start: "x", port: 0, domain: "wiki.home.arpa", prot: 1 }
    }));
}
