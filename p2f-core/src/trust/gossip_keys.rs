//! The node's gossip keys, kept across restarts: the secrets they are derived from, which one
//! is primary, in `DATA/cluster/gossip-keys.json` (0600, written whole through a rename), with
//! the primary also in `DATA/cluster/secret` (what a join hands out, what older tools read).
//! Each change is saved first, then given to the running mesh.
//!
//! A rotation (`p2f cluster rotate-key`, run by the root over every live node's API) installs a
//! new key everywhere, then makes it primary everywhere, then removes the old one everywhere:
//! at every step every node accepts what every other sends, so nobody goes silent
//! ([`crate::mesh::KeyRing`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::api_error::ApiError;
use crate::cluster::{ClusterError, ClusterFiles, Secret};
use crate::mesh::{KeyId, KeyInfo, KeyRing, Mesh, MeshError};
use crate::records::Records;
use crate::wire::{InstallKeyRequest, UseKeyRequest};

/// The file of the ring, in the cluster directory.
const FILE: &str = "gossip-keys.json";

/// Why a key change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GossipKeyError {
    /// The ring refused it (unknown key, full, the primary removed).
    #[error(transparent)]
    Ring(#[from] MeshError),
    /// The ring could not be saved; nothing changed.
    #[error(transparent)]
    Save(#[from] crate::fsutil::WriteError),
    /// A secret that is not one.
    #[error(transparent)]
    Secret(#[from] ClusterError),
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    secret: String,
    primary: bool,
}

/// The node's gossip keys (see the module's documentation).
pub struct GossipKeys {
    cluster: ClusterFiles,
    /// The secrets, the primary first.
    secrets: Mutex<Vec<Secret>>,
}

impl std::fmt::Debug for GossipKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipKeys")
            .field("keys", &self.list())
            .finish_non_exhaustive()
    }
}

impl GossipKeys {
    /// The keys saved in `cluster`'s directory, or the cluster secret alone when no ring was
    /// saved (a node that never rotated). A damaged file is ignored with a warning (the
    /// cluster secret is used).
    pub fn load(cluster: &ClusterFiles, secret: &Secret) -> GossipKeys {
        let path = cluster.dir().join(FILE);
        let saved: Vec<Secret> = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Entry>>(&bytes) {
                Ok(entries) => {
                    let mut entries: Vec<Entry> = entries;
                    entries.sort_by_key(|e| !e.primary);
                    entries
                        .iter()
                        .filter_map(|e| Secret::parse(&e.secret).ok())
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable gossip keys, using the cluster secret: {e}");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        let secrets = if saved.is_empty() {
            vec![secret.clone()]
        } else {
            saved
        };
        GossipKeys {
            cluster: cluster.clone(),
            secrets: Mutex::new(secrets),
        }
    }

    /// The ring for the mesh's configuration.
    pub fn ring(&self) -> KeyRing {
        ring_of(&self.lock())
    }

    /// The primary key's secret (what a joining member gets).
    pub fn primary(&self) -> Secret {
        self.lock()[0].clone()
    }

    /// The keys' ids, the primary first.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.ring().keys()
    }

    /// Installs the key of `secret` as accepted (not primary); saved, then in `mesh` (the
    /// running one, if any).
    pub fn install(&self, secret: &Secret, mesh: Option<&Mesh>) -> Result<KeyId, GossipKeyError> {
        self.change(|secrets| {
            let mut ring = ring_of(secrets);
            let id = ring.install(secret)?;
            if !secrets.iter().any(|s| KeyId::of(s) == id) {
                secrets.push(secret.clone());
            }
            Ok(id)
        })
        .and_then(|id| {
            if let Some(mesh) = mesh {
                mesh.install_key(secret)?;
            }
            Ok(id)
        })
    }

    /// Makes key `id` primary; saved (the cluster secret file too), then in `mesh`.
    pub fn use_key(&self, id: KeyId, mesh: Option<&Mesh>) -> Result<(), GossipKeyError> {
        self.change(|secrets| {
            ring_of(secrets).use_key(id)?;
            if let Some(at) = secrets.iter().position(|s| KeyId::of(s) == id) {
                let secret = secrets.remove(at);
                secrets.insert(0, secret);
            }
            Ok(())
        })?;
        if let Some(mesh) = mesh {
            mesh.use_key(id)?;
        }
        Ok(())
    }

    /// Removes key `id` (not the primary); saved, then in `mesh`.
    pub fn remove(&self, id: KeyId, mesh: Option<&Mesh>) -> Result<(), GossipKeyError> {
        self.change(|secrets| {
            ring_of(secrets).remove(id)?;
            secrets.retain(|s| KeyId::of(s) != id);
            Ok(())
        })?;
        if let Some(mesh) = mesh {
            mesh.remove_key(id)?;
        }
        Ok(())
    }

    /// Runs `edit` on a copy of the secrets, saves the result and keeps it, or changes nothing.
    fn change<T>(
        &self,
        edit: impl FnOnce(&mut Vec<Secret>) -> Result<T, MeshError>,
    ) -> Result<T, GossipKeyError> {
        let mut secrets = self.lock();
        let mut next = secrets.clone();
        let value = edit(&mut next)?;
        let entries: Vec<Entry> = next
            .iter()
            .enumerate()
            .map(|(i, s)| Entry {
                secret: s.expose().to_owned(),
                primary: i == 0,
            })
            .collect();
        let json = serde_json::to_vec_pretty(&entries).unwrap_or_default();
        crate::fsutil::write_private(&self.path(), json)?;
        crate::fsutil::write_private(
            &self.cluster.secret_path(),
            format!("{}\n", next[0].expose()),
        )?;
        *secrets = next;
        Ok(value)
    }

    fn path(&self) -> PathBuf {
        self.cluster.dir().join(FILE)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Secret>> {
        self.secrets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The routes of a node's gossip keys (`/v1/gossip-keys`; changes by the root and operators
/// only, like every write to another node): list, install, make primary, remove. `records`
/// gives the running mesh, when the node gossips.
pub fn routes(keys: Arc<GossipKeys>, records: Option<Records>) -> Router {
    Router::new()
        .route("/v1/gossip-keys", get(list).post(install))
        .route("/v1/gossip-keys/primary", put(make_primary))
        .route("/v1/gossip-keys/{id}", delete(remove))
        .with_state(KeysApi { keys, records })
}

#[derive(Clone)]
struct KeysApi {
    keys: Arc<GossipKeys>,
    records: Option<Records>,
}

impl KeysApi {
    fn mesh(&self) -> Option<&Mesh> {
        self.records.as_ref().map(Records::mesh)
    }
}

impl From<GossipKeyError> for ApiError {
    fn from(e: GossipKeyError) -> ApiError {
        let status = match &e {
            GossipKeyError::Ring(MeshError::UnknownKey(_)) => StatusCode::NOT_FOUND,
            GossipKeyError::Ring(MeshError::BadKeyId(_)) | GossipKeyError::Secret(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            GossipKeyError::Ring(_) => StatusCode::CONFLICT,
            GossipKeyError::Save(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

async fn list(State(api): State<KeysApi>) -> Json<Vec<KeyInfo>> {
    Json(api.keys.list())
}

async fn install(
    State(api): State<KeysApi>,
    body: Result<Json<InstallKeyRequest>, JsonRejection>,
) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    let Json(request) = body?;
    let secret = Secret::parse(&request.secret).map_err(GossipKeyError::from)?;
    api.keys.install(&secret, api.mesh())?;
    Ok(Json(api.keys.list()))
}

async fn make_primary(
    State(api): State<KeysApi>,
    body: Result<Json<UseKeyRequest>, JsonRejection>,
) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    let Json(request) = body?;
    api.keys.use_key(request.id, api.mesh())?;
    Ok(Json(api.keys.list()))
}

async fn remove(
    State(api): State<KeysApi>,
    Path(id): Path<String>,
) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    let id: KeyId = id.parse().map_err(GossipKeyError::from)?;
    api.keys.remove(id, api.mesh())?;
    Ok(Json(api.keys.list()))
}

/// The ring of `secrets`, the first primary (a secret the ring refuses is left out, saying so).
fn ring_of(secrets: &[Secret]) -> KeyRing {
    let mut ring = KeyRing::new(&secrets[0]);
    for secret in &secrets[1..] {
        if let Err(e) = ring.install(secret) {
            tracing::warn!("a saved gossip key is left out: {e}");
        }
    }
    ring
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_is_saved_and_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = ClusterFiles::new(dir.path().join("cluster"));
        let (_, old) = cluster.create("test").expect("cluster");
        let keys = GossipKeys::load(&cluster, &old);
        assert_eq!(keys.list().len(), 1);
        let new = Secret::generate();
        let id = keys.install(&new, None).expect("install");
        keys.use_key(id, None).expect("use");
        keys.remove(KeyId::of(&old), None).expect("remove");
        assert!(
            keys.remove(id, None).is_err(),
            "the primary is never removed"
        );
        let again = GossipKeys::load(&cluster, &old);
        assert_eq!(again.list(), [KeyInfo { id, primary: true }]);
        assert_eq!(again.primary().expose(), new.expose());
        let on_disk = std::fs::read_to_string(cluster.secret_path()).expect("secret");
        assert_eq!(
            on_disk.trim(),
            new.expose(),
            "the secret file follows the primary"
        );
    }
}
