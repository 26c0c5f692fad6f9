//! Records as the API lists them. A node may answer `list_processes` for ten thousand records
//! many times between two changes of any one of them, so each record is shared (`Arc`) and
//! encoded as JSON once per change; a list is those encodings joined into one array.

use std::sync::Arc;

use p2f_model::Process;

/// A record and its JSON encoding, made once and shared until the record changes.
#[derive(Debug, Clone)]
pub struct Listed {
    process: Arc<Process>,
    json: Arc<[u8]>,
}

impl Listed {
    /// Encodes `process`.
    pub fn new(process: Process) -> Listed {
        // A record always encodes: it is plain data (strings, numbers, maps with string keys).
        let json = serde_json::to_vec(&process).unwrap_or_else(|_| b"null".to_vec());
        Listed {
            process: Arc::new(process),
            json: json.into(),
        }
    }

    /// The record.
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// Its JSON encoding.
    pub fn json(&self) -> &[u8] {
        &self.json
    }
}

/// The JSON array of `items`, in their order.
pub fn json_array(items: &[Listed]) -> Vec<u8> {
    let len = items.iter().map(|l| l.json.len() + 1).sum::<usize>() + 2;
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&item.json);
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::{NodeRef, ProcessId, ProcessSpec, Timestamp};

    fn record(id: &str, generation: u64) -> Process {
        Process::placed(
            ProcessId::new(id).expect("id"),
            generation,
            ProcessSpec::new("web", "exec sleep 1"),
            NodeRef {
                name: p2f_model::NodeName::from_static("a"),
                address: "127.0.0.1".into(),
            },
            Timestamp(1),
        )
    }

    #[test]
    fn the_array_decodes_to_the_records_in_order() {
        let items = vec![
            Listed::new(record("web-2", 1)),
            Listed::new(record("web-1", 3)),
        ];
        let decoded: Vec<Process> =
            serde_json::from_slice(&json_array(&items)).expect("valid JSON");
        assert_eq!(decoded, vec![record("web-2", 1), record("web-1", 3)]);
        assert_eq!(json_array(&[]), b"[]");
    }
}
