//! What the parser produces: the model's own values, plus the tokens each rule may point at.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use p2f_model::{Field, Location, NodeName, SpecParts};
use proc_macro2::TokenStream;

/// The parsed `deployment! { .. }`.
pub(crate) struct Input {
    /// The valid entries of `nodes: [..]`, with their positions in the list.
    pub(crate) nodes: Vec<NodeName>,
    /// The services, in order.
    pub(crate) services: Vec<Service>,
    /// The tokens of every place a finding can point at.
    pub(crate) anchors: HashMap<Location, TokenStream>,
}

/// One `service NAME { .. }`.
pub(crate) struct Service {
    /// The spec as declared; bundle files carry paths but no contents (those are embedded).
    pub(crate) parts: SpecParts,
    /// Fields written in the block (even when their value was rejected).
    pub(crate) given: BTreeSet<Field>,
    /// Fields whose value was rejected: findings that depend on them are not reported, so the
    /// user sees the one real error instead of a cascade.
    pub(crate) poisoned: BTreeSet<Field>,
    /// The files to embed: (path in the bundle, path on disk).
    pub(crate) embeds: Vec<(String, PathBuf)>,
    /// Where the strategy's file or directory was looked for.
    pub(crate) resolved: Option<PathBuf>,
}
