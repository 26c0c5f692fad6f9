//! Runs the shared rules of `p2f_model::validate` on the parsed input and turns each finding into
//! a compile error at the token it is about.

use p2f_model::validate::{self, Field};
use p2f_model::{Deployment, Finding, Location, ProcessSpec, Rule};
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
            Some(path) => format!("{} (looked for `{}`)", finding.message, path.display()),
            None => finding.message.clone(),
        },
        _ => finding.message.clone(),
    };
    if let Some(help) = &finding.help {
        text.push_str("\n\nhelp: ");
        text.push_str(help);
    }
    text
}
