//! What a node publishes about each of its processes: a small digest under `p/<process-id>`,
//! never the record itself (a record holds its spec's bundle, which can be megabytes; peers fetch
//! it over the control API when they need it).

use p2f_model::{NodeName, Process, ProcessId, ProcessSpec, Status, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The key prefix of process digests.
pub const PROCESS_PREFIX: &str = "p/";

/// One process as the mesh spreads it: enough to list the network and to notice that a record
/// changed, small enough for hundreds per datagram. Its JSON is at most ~600 bytes (ids are at
/// most 128 bytes, node names 64, domains 253), typically under 200.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessDigest {
    /// The process id.
    pub id: ProcessId,
    /// Its generation: a higher one supersedes every copy with a lower one.
    pub generation: u64,
    /// Where it is in its life (a failure carries its reason).
    pub status: Status,
    /// Restarts in place since it was placed.
    #[serde(default)]
    pub restarts: u32,
    /// When its command last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// Its OS process id on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Whether its health check passed since it started.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub healthy: bool,
    /// The node it runs on.
    pub node: NodeName,
    /// Its port, if any.
    pub port: Option<u16>,
    /// Its domain, if any.
    pub domain: Option<String>,
    /// [`spec_hash`] of its spec: the spec changed when this did.
    pub spec: String,
}

impl ProcessDigest {
    /// The digest of `process`.
    pub fn of(process: &Process) -> ProcessDigest {
        ProcessDigest::with_spec_hash(process, spec_hash(&process.spec))
    }

    /// The digest of `process` whose [`spec_hash`] is already known to be `spec`.
    pub fn with_spec_hash(process: &Process, spec: String) -> ProcessDigest {
        ProcessDigest {
            id: process.id.clone(),
            generation: process.generation,
            status: short_status(&process.status),
            restarts: process.restarts,
            started_at: process.started_at,
            pid: process.pid,
            healthy: process.passed_health_check(),
            node: process.node.name.clone(),
            port: process.port.or(process.spec.port()),
            domain: process.spec.domain().map(str::to_owned),
            spec,
        }
    }

    /// The mesh key of process `id`: `p/<id>`.
    pub fn key_for(id: &ProcessId) -> String {
        format!("{PROCESS_PREFIX}{id}")
    }

    /// This digest's mesh key.
    pub fn key(&self) -> String {
        ProcessDigest::key_for(&self.id)
    }

    /// The mesh value: compact JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a digest of strings and numbers always serializes")
    }

    /// Reads a mesh value written by [`ProcessDigest::encode`].
    pub fn decode(value: &str) -> Result<ProcessDigest, serde_json::Error> {
        serde_json::from_str(value)
    }
}

/// The longest failure text a digest carries; the whole text is in the record.
const FAILURE_TEXT: usize = 200;

/// `status` with its failure's free text (a deploy step's output, a health check's answer) cut
/// to [`FAILURE_TEXT`] bytes, so a digest stays small.
fn short_status(status: &Status) -> Status {
    let cut = |text: &str| -> String {
        let mut end = text.len().min(FAILURE_TEXT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_owned()
    };
    match status {
        Status::Failed(p2f_model::Failure::DeployFailed { exit, stderr_tail }) => {
            // The end of a tail says most: keep its last bytes.
            let mut start = stderr_tail.len().saturating_sub(FAILURE_TEXT);
            while !stderr_tail.is_char_boundary(start) {
                start += 1;
            }
            Status::Failed(p2f_model::Failure::DeployFailed {
                exit: *exit,
                stderr_tail: stderr_tail[start..].to_owned(),
            })
        }
        Status::Failed(p2f_model::Failure::HealthCheckFailed { check, detail }) => {
            Status::Failed(p2f_model::Failure::HealthCheckFailed {
                check: cut(check),
                detail: cut(detail),
            })
        }
        other => other.clone(),
    }
}

/// The first 16 hex digits (64 bits) of the SHA-256 of the spec's JSON form, bundle included.
pub fn spec_hash(spec: &ProcessSpec) -> String {
    let json = serde_json::to_vec(spec).expect("a spec always serializes");
    let digest = Sha256::digest(&json);
    let mut hex = String::with_capacity(16);
    for byte in &digest[..8] {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

#[cfg(test)]
mod tests {
    use p2f_model::Failure;

    use super::*;

    #[test]
    fn failure_text_is_cut_to_keep_digests_small() {
        let long = "é".repeat(300);
        let deploy = short_status(&Status::Failed(Failure::DeployFailed {
            exit: Some(1),
            stderr_tail: format!("{long}\nerror: the end"),
        }));
        let Status::Failed(Failure::DeployFailed { stderr_tail, .. }) = deploy else {
            panic!("still a deploy failure");
        };
        assert!(stderr_tail.len() <= FAILURE_TEXT && stderr_tail.ends_with("error: the end"));
        let health = short_status(&Status::Failed(Failure::HealthCheckFailed {
            check: "tcp :80".into(),
            detail: long.clone(),
        }));
        let Status::Failed(Failure::HealthCheckFailed { check, detail }) = health else {
            panic!("still a health failure");
        };
        assert_eq!(check, "tcp :80");
        assert!(detail.len() <= FAILURE_TEXT && !detail.is_empty());
        assert_eq!(short_status(&Status::Running), Status::Running);
    }
}
