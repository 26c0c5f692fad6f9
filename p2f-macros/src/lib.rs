//! The `deployment!` macro: a thin shell over ordinary code. `parse` reads the input into the
//! model (keeping a token for every place a rule can point at), `embed` finds the files that
//! strategies name, `check` runs the shared rules of `p2f_model::validate` and turns each finding
//! into a compile error at its token, and `expand` writes the `const`-evaluable `Deployment`.

mod ast;
mod check;
mod embed;
mod expand;
mod parse;
#[cfg(test)]
mod tests;

/// Declares a deployment; see the `p2f` crate's documentation for the language.
#[proc_macro]
pub fn deployment(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    expand::deployment(input.into()).into()
}
