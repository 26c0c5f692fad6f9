//! Revoked certificates: the serial numbers of the certificates of removed nodes and operators
//! (`p2f node remove`, `p2f operator remove`), which every node refuses on its API. The root
//! keeps the list and gives it to every live node (`PUT /v1/revoked`) when it changes; members
//! also fetch it from the root every [`PULL_EVERY`] (a node that was down catches up). Kept in
//! `DATA/cluster/revoked.json` (written whole through a rename).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::api_error::ApiError;
use crate::identity::Caller;
#[cfg(test)]
use crate::identity::Role;

/// How often a member fetches the list from the root.
pub const PULL_EVERY: Duration = Duration::from_secs(30);

pub use crate::wire::Revocation;

/// The revoked certificates a node refuses (see the module's documentation).
#[derive(Debug)]
pub struct Revoked {
    path: PathBuf,
    entries: RwLock<Vec<Revocation>>,
    serials: RwLock<HashSet<String>>,
}

impl Revoked {
    /// The list saved in `path` (empty when there is none; a damaged file is ignored with a
    /// warning, and replaced at the next change).
    pub fn load(path: PathBuf) -> Revoked {
        let entries: Vec<Revocation> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "unreadable revocation list: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let serials = entries.iter().map(|e| e.serial.clone()).collect();
        Revoked {
            path,
            entries: RwLock::new(entries),
            serials: RwLock::new(serials),
        }
    }

    /// Whether `caller`'s certificate is revoked.
    pub fn refuses(&self, caller: &Caller) -> bool {
        self.serials
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&caller.serial)
    }

    /// Every revocation.
    pub fn list(&self) -> Vec<Revocation> {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the list with `entries` (saved first); `false` when it was that already.
    ///
    /// Errors: the file cannot be written (nothing changed).
    pub fn replace(&self, mut entries: Vec<Revocation>) -> Result<bool, crate::fsutil::WriteError> {
        entries.sort_by(|a, b| a.serial.cmp(&b.serial));
        entries.dedup_by(|a, b| a.serial == b.serial);
        let mut current = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if *current == entries {
            return Ok(false);
        }
        let json = serde_json::to_vec_pretty(&entries).unwrap_or_default();
        crate::fsutil::write_private(&self.path, json)?;
        *self.serials.write().unwrap_or_else(PoisonError::into_inner) =
            entries.iter().map(|e| e.serial.clone()).collect();
        *current = entries;
        Ok(true)
    }

    /// Adds `more` to the list (saved); returns the whole list.
    pub fn add(&self, more: Vec<Revocation>) -> Result<Vec<Revocation>, crate::fsutil::WriteError> {
        let mut all = self.list();
        all.extend(more);
        self.replace(all)?;
        Ok(self.list())
    }
}

/// `GET /v1/revoked` (any caller with a certificate) and `PUT /v1/revoked` (the root and
/// operators: every write to another node is theirs) on every node.
pub fn routes(revoked: Arc<Revoked>) -> Router {
    Router::new()
        .route("/v1/revoked", get(list).put(replace))
        .with_state(revoked)
}

async fn list(State(revoked): State<Arc<Revoked>>) -> Json<Vec<Revocation>> {
    Json(revoked.list())
}

async fn replace(
    State(revoked): State<Arc<Revoked>>,
    body: Result<Json<Vec<Revocation>>, JsonRejection>,
) -> Result<Json<Vec<Revocation>>, ApiError> {
    let Json(entries) = body?;
    if revoked
        .replace(entries)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    {
        tracing::info!(count = revoked.list().len(), "revocation list updated");
    }
    Ok(Json(revoked.list()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_serial_is_refused_and_the_list_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("revoked.json");
        let revoked = Revoked::load(path.clone());
        let caller = |serial: &str| Caller {
            role: Role::Member,
            name: "pi".into(),
            serial: serial.into(),
        };
        assert!(!revoked.refuses(&caller("0a")));
        let entry = Revocation {
            serial: "0a".into(),
            role: Role::Member,
            name: "pi".into(),
            at: 1,
        };
        revoked.add(vec![entry.clone()]).expect("add");
        assert!(revoked.refuses(&caller("0a")));
        assert!(!revoked.refuses(&caller("0b")));
        assert!(
            !revoked.replace(vec![entry.clone()]).expect("same"),
            "unchanged"
        );
        assert!(Revoked::load(path).refuses(&caller("0a")));
    }
}
