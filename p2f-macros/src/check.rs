//! Runs the shared rules of `p2f_model::validate` on the parsed input and turns each finding into
//! a compile error at the token it is about.

use std::path::{Path, PathBuf};

use p2f_model::validate::{self, Field};
use p2f_model::{Deployment, Finding, Location, ProcessSpec, Rule, Strategy};
use proc_macro2::TokenStream;

use crate::ast::Input;
use crate::parse::Errors;

/// Reports every finding of the shared rules on `input` into `errors`.
pub(crate) fn check(input: &Input, errors: &mut Errors) {
    let model = Deployment::owned(
        input.nodes.clone(),
        input
            .services
            .iter()
            .map(|s| ProcessSpec::from_parts(s.parts.clone()))
            .collect(),
    );
    for finding in validate::deployment(&model) {
        if depends_on_rejected_value(input, &finding) {
            continue;
        }
        errors.at(anchor(input, finding.at), message(input, &finding));
    }
}

/// A finding about a value the parser already rejected would be a second error for one
/// mistake (e.g. "`domain` needs `port`" after "port 0 is not allowed").
fn depends_on_rejected_value(input: &Input, finding: &Finding) -> bool {
    let service = match finding.at {
        Location::Service(n) | Location::Field(n, _) | Location::Item(n, _, _) => {
            &input.services[n]
        }
        Location::Node(_) | Location::Deployment => return false,
    };
    let rejected = |f: Field| service.poisoned.contains(&f);
    match (finding.rule, finding.at) {
        (Rule::DomainWithoutPort, _) => rejected(Field::Port) || rejected(Field::Domain),
        // A rejected `pin` leaves its service looking unpinned, which would clash with every
        // service on the same port.
        (Rule::PortConflict, _) => {
            rejected(Field::Port)
                || input
                    .services
                    .iter()
                    .any(|s| s.parts.port == service.parts.port && s.poisoned.contains(&Field::Pin))
        }
        (Rule::MissingStart, _) => rejected(Field::Start),
        (Rule::MissingFile, _) => rejected(Field::Strategy),
        (_, Location::Field(_, f) | Location::Item(_, f, _)) => rejected(f),
        _ => false,
    }
}

/// The most precise token known for `at`: an item, else its field, else its service.
fn anchor(input: &Input, at: Location) -> TokenStream {
    let fallbacks = match at {
        Location::Item(n, f, i) => vec![
            Location::Item(n, f, i),
            Location::Field(n, f),
            Location::Service(n),
        ],
        Location::Field(n, f) => vec![Location::Field(n, f), Location::Service(n)],
        other => vec![other],
    };
    fallbacks
        .into_iter()
        .find_map(|loc| input.anchors.get(&loc).cloned())
        .unwrap_or_else(|| quote::quote!(deployment))
}

fn message(input: &Input, finding: &Finding) -> String {
    let mut text = match (finding.rule, finding.at) {
        (Rule::MissingStart, Location::Field(n, _))
            if !input.services[n].given.contains(&Field::Start) =>
        {
            format!(
                "service `{}` has no `start`: it is required",
                input.services[n].parts.name
            )
        }
        (Rule::MissingFile, Location::Field(n, _)) => match &input.services[n].resolved {
            Some(path) => missing_file(&input.services[n].parts.strategy, path)
                .unwrap_or_else(|| finding.message.clone()),
            None => finding.message.clone(),
        },
        _ => finding.message.clone(),
    };
    if let Some(help) = &finding.help {
        text.push_str("; ");
        text.push_str(help);
    }
    text
}

/// What is missing on disk, and where the macro looked. The shared rule only sees the bundle,
/// which at compile time lacks a file exactly when it is missing on disk.
fn missing_file(strategy: &Strategy, resolved: &Path) -> Option<String> {
    // `components` drops the `.` parts of e.g. `Nix("./deploy/meet")`.
    let shown: PathBuf = resolved.components().collect();
    Some(match strategy {
        Strategy::Nix(dir) if resolved.is_dir() => format!(
            "the Nix flake directory `{dir}` has no `flake.nix` (looked for `{}`)",
            shown.join("flake.nix").display()
        ),
        Strategy::Nix(dir) => format!(
            "the Nix flake directory `{dir}` does not exist (looked for `{}`)",
            shown.display()
        ),
        Strategy::Script(file) | Strategy::Ansible(file) => {
            let what = if matches!(strategy, Strategy::Script(_)) {
                "script"
            } else {
                "playbook"
            };
            if resolved.is_dir() {
                format!(
                    "the {what} `{file}` is a directory, not a file (`{}`)",
                    shown.display()
                )
            } else {
                format!(
                    "the {what} `{file}` does not exist (looked for `{}`)",
                    shown.display()
                )
            }
        }
        Strategy::Shell | Strategy::Custom(_) => return None,
    })
}
