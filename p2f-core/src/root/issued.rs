//! The certificates the root's CA issued to members and operators: serial, role and name, in
//! `DATA/cluster/issued.json` (0600, written whole through a rename). Removing a node or an
//! operator revokes every certificate issued to that name ([`super::super::node::revoked`]).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::identity::{Caller, Role};

/// The file in the cluster directory.
pub const FILE: &str = "issued.json";

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedCert {
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// Its holder's role.
    pub role: Role,
    /// Its holder's name.
    pub name: String,
    /// When it was issued, in seconds since the Unix epoch.
    pub at: u64,
}

/// The register of issued certificates (see the module's documentation).
#[derive(Debug)]
pub struct Issued {
    path: PathBuf,
    entries: Mutex<Vec<IssuedCert>>,
}

impl Issued {
    /// The register in the cluster directory `dir` (empty when there is none).
    pub fn open(dir: &Path) -> Issued {
        let path = dir.join(FILE);
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Issued {
            path,
            entries: Mutex::new(entries),
        }
    }

    /// Records the certificate `cert_pem` (it must name a role).
    ///
    /// Errors: the file cannot be written.
    pub fn record(&self, cert_pem: &str) -> Result<(), crate::fsutil::WriteError> {
        let Some(Caller { role, name, serial }) = Caller::from_pem(cert_pem) else {
            return Ok(());
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = entries.clone();
        next.push(IssuedCert {
            serial,
            role,
            name,
            at: crate::root::tokens::now_secs(),
        });
        let json = serde_json::to_vec_pretty(&next).unwrap_or_default();
        crate::fsutil::write_private(&self.path, json)?;
        *entries = next;
        Ok(())
    }

    /// The certificates issued to `role` `name`.
    pub fn of(&self, role: Role, name: &str) -> Vec<IssuedCert> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|e| e.role == role && e.name == name)
            .cloned()
            .collect()
    }
}
