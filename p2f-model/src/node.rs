//! P2PRC compatibility: the IP-table entry (`Node`) and `config.json` (`P2prcConfig`), read
//! leniently from every historical format and written back in the current one.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::NodeName;

/// Why a P2PRC entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A field has a value of the wrong shape.
    #[error("field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

fn field_error(field: &'static str, message: impl Into<String>) -> NodeError {
    NodeError::Field {
        field,
        message: message.into(),
    }
}

/// P2F's own facts about a node, carried in `CustomInformation` under the key `p2f`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct P2fNodeInfo {
    /// The address of its control API (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The P2F version it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its role in the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
}

/// What a node is in its network, computed once when its agent starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// It holds the cluster CA key: it places processes and admits nodes.
    Root,
    /// It gossips with the others and runs what the root places on it.
    Member,
    /// No mesh and no CA key: it runs what it is given and knows no other node.
    Alone,
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeRole::Root => "root",
            NodeRole::Member => "member",
            NodeRole::Alone => "alone",
        })
    }
}

/// One entry of P2PRC's IP table: a node of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `Name`: stable machine name.
    pub name: NodeName,
    /// `MachineUsername`.
    pub machine_username: String,
    /// `IPV4`.
    pub ipv4: Option<Ipv4Addr>,
    /// `IPV6`.
    pub ipv6: Option<Ipv6Addr>,
    /// `Latency` (P2PRC stores nanoseconds).
    pub latency: Duration,
    /// `Download` speed as P2PRC measured it.
    pub download: u64,
    /// `Upload` speed as P2PRC measured it.
    pub upload: u64,
    /// `ServerPort`: P2PRC's HTTP server.
    pub server_port: Option<u16>,
    /// `BareMetalSSHPort`.
    pub bare_metal_ssh_port: Option<u16>,
    /// `UDPServerPort`.
    pub udp_server_port: Option<u16>,
    /// `NAT`: whether the node is behind NAT.
    pub nat: bool,
    /// `EscapeImplementation` (e.g. `FRP`).
    pub escape_implementation: String,
    /// `ProxyServer`: whether it relays for others (a root node).
    pub proxy_server: bool,
    /// `UnSafeMode`.
    pub unsafe_mode: bool,
    /// `PublicKey` (an SSH public key line).
    pub public_key: String,
    /// `CustomInformation`, verbatim.
    pub custom_information: String,
}

impl Node {
    /// A node with this name and nothing else known.
    pub fn named(name: NodeName) -> Node {
        Node {
            name,
            machine_username: String::new(),
            ipv4: None,
            ipv6: None,
            latency: Duration::ZERO,
            download: 0,
            upload: 0,
            server_port: None,
            bare_metal_ssh_port: None,
            udp_server_port: None,
            nat: false,
            escape_implementation: String::new(),
            proxy_server: false,
            unsafe_mode: true,
            public_key: String::new(),
            custom_information: String::new(),
        }
    }

    /// P2F's facts from `CustomInformation`, if it holds a JSON object with a `p2f` key.
    pub fn p2f_info(&self) -> Option<P2fNodeInfo> {
        let value: serde_json::Value = serde_json::from_str(&self.custom_information).ok()?;
        serde_json::from_value(value.get("p2f")?.clone()).ok()
    }

    /// A copy whose `CustomInformation` carries `info` under `p2f`. Other keys are kept; text
    /// that is not a JSON object is kept under the key `text`.
    pub fn with_p2f_info(&self, info: &P2fNodeInfo) -> Node {
        let mut object = match serde_json::from_str::<serde_json::Value>(&self.custom_information) {
            Ok(serde_json::Value::Object(map)) => map,
            _ if self.custom_information.trim().is_empty() => serde_json::Map::new(),
            _ => {
                let mut map = serde_json::Map::new();
                map.insert("text".into(), self.custom_information.clone().into());
                map
            }
        };
        object.insert("p2f".into(), serde_json::to_value(info).unwrap_or_default());
        Node {
            custom_information: serde_json::Value::Object(object).to_string(),
            ..self.clone()
        }
    }

    /// The address P2F's API of this node answers on, if published.
    pub fn api_address(&self) -> Option<String> {
        self.p2f_info().and_then(|i| i.api)
    }
}

/// P2PRC's `ip_table.json`: `{ "ip_address": [ Node, ... ] }`.
///
/// Read leniently per entry, as P2PRC reads it: an entry that cannot be used (a name P2F
/// cannot use, a port out of range, not an object) is left out and listed in
/// [`IpTable::skipped`] with why, and the other entries load. Keys are matched without regard
/// to case (`ip_address`, `Name`, `name`). Written in the current format, without the skipped
/// entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct IpTable {
    /// The nodes.
    #[serde(rename = "ip_address")]
    pub ip_address: Vec<Node>,
    /// The entries that were left out when the table was read, in order.
    #[serde(skip)]
    pub skipped: Vec<SkippedEntry>,
}

/// An entry of an IP table that was left out when the table was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    /// Its position in the table (from 0).
    pub index: usize,
    /// Its `Name` as P2PRC wrote it, when it had one as text.
    pub name: Option<String>,
    /// Why it was left out (the field and what was wrong with it).
    pub reason: String,
}

impl std::fmt::Display for SkippedEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "entry {} ({name:?}): {}", self.index, self.reason),
            None => write!(f, "entry {}: {}", self.index, self.reason),
        }
    }
}

impl<'de> Deserialize<'de> for IpTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let entries = raw
            .into_iter()
            .find(|(key, _)| key.eq_ignore_ascii_case("ip_address"))
            .map(|(_, value)| value)
            .unwrap_or(serde_json::Value::Null);
        let entries = match entries {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Array(entries) => entries,
            _ => return Err(de::Error::custom("`ip_address` must be a list of entries")),
        };
        let mut table = IpTable::default();
        for (index, entry) in entries.into_iter().enumerate() {
            let name = entry
                .as_object()
                .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("name")))
                .and_then(|(_, v)| v.as_str())
                .map(str::to_owned);
            match Node::deserialize(entry) {
                Ok(node) => table.ip_address.push(node),
                Err(e) => table.skipped.push(SkippedEntry {
                    index,
                    name,
                    reason: e.to_string(),
                }),
            }
        }
        Ok(table)
    }
}

fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A JSON scalar of whatever type an older P2PRC wrote.
#[derive(Debug, Clone, PartialEq)]
enum Loose {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Text(String),
    /// A list or an object: never a valid value of a known field, skipped for unknown ones.
    Compound,
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LooseVisitor;
        impl<'de> Visitor<'de> for LooseVisitor {
            type Value = Loose;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, number, boolean or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
                Ok(Loose::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
                Ok(Loose::Null)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Loose, E> {
                Ok(Loose::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose::Int(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose, E> {
                Ok(Loose::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Loose, E> {
                Ok(Loose::Text(v))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Compound)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
                while map
                    .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Loose::Compound)
            }
        }
        d.deserialize_any(LooseVisitor)
    }
}

impl Loose {
    fn text(self, field: &'static str) -> Result<String, NodeError> {
        match self {
            Loose::Null => Ok(String::new()),
            Loose::Text(s) => Ok(s),
            Loose::Bool(b) => Ok(b.to_string()),
            Loose::Int(i) => Ok(i.to_string()),
            Loose::Float(_) => Err(field_error(
                field,
                "expected text, found a number with a fraction",
            )),
            Loose::Compound => Err(field_error(
                field,
                "expected text, found a list or an object",
            )),
        }
    }

    fn flag(self, field: &'static str) -> Result<bool, NodeError> {
        match self {
            Loose::Null => Ok(false),
            Loose::Bool(b) => Ok(b),
            Loose::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" | "" => Ok(false),
                _ => Err(field_error(
                    field,
                    format!("expected true or false, found {s:?}"),
                )),
            },
            Loose::Int(0) => Ok(false),
            Loose::Int(1) => Ok(true),
            other => Err(field_error(
                field,
                format!("expected true or false, found {other:?}"),
            )),
        }
    }

    fn count(self, field: &'static str) -> Result<u64, NodeError> {
        match self {
            Loose::Null => Ok(0),
            Loose::Int(i) => u64::try_from(i).map_err(|_| {
                field_error(field, format!("expected a non-negative number, found {i}"))
            }),
            Loose::Float(f) if f >= 0.0 && f.is_finite() => Ok(f.round() as u64),
            Loose::Text(s) if s.trim().is_empty() => Ok(0),
            Loose::Text(s) => s
                .trim()
                .parse()
                .map_err(|_| field_error(field, format!("expected a number, found {s:?}"))),
            other => Err(field_error(
                field,
                format!("expected a number, found {other:?}"),
            )),
        }
    }

    fn port(self, field: &'static str) -> Result<Option<u16>, NodeError> {
        let n = match self {
            Loose::Null => return Ok(None),
            Loose::Text(s) if s.trim().is_empty() => return Ok(None),
            Loose::Text(s) => s
                .trim()
                .parse::<i128>()
                .map_err(|_| field_error(field, format!("expected a port number, found {s:?}")))?,
            Loose::Int(i) => i,
            other => {
                return Err(field_error(
                    field,
                    format!("expected a port number, found {other:?}"),
                ));
            }
        };
        match n {
            0 => Ok(None),
            1..=65535 => Ok(Some(n as u16)),
            _ => Err(field_error(
                field,
                format!("port {n} is out of range 1-65535"),
            )),
        }
    }

    fn address<A: std::str::FromStr>(self, field: &'static str) -> Result<Option<A>, NodeError> {
        let text = self.text(field)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| field_error(field, format!("{text:?} is not an IP address")))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Keys without regard to case; where two differ only in case, the first in sort order
        // (P2PRC's own capitalised spelling before a lower-case one) counts.
        let mut raw = BTreeMap::<String, Loose>::new();
        for (key, value) in BTreeMap::<String, Loose>::deserialize(d)? {
            raw.entry(key.to_ascii_lowercase()).or_insert(value);
        }
        let mut take = |key: &str| raw.remove(&key.to_ascii_lowercase()).unwrap_or(Loose::Null);
        let name_text = take("Name").text("Name").map_err(de::Error::custom)?;
        let name = NodeName::new(name_text)
            .map_err(|e| de::Error::custom(field_error("Name", e.to_string())))?;
        let node = (|| -> Result<Node, NodeError> {
            Ok(Node {
                name,
                machine_username: take("MachineUsername").text("MachineUsername")?,
                ipv4: take("IPV4").address("IPV4")?,
                ipv6: take("IPV6").address("IPV6")?,
                latency: Duration::from_nanos(take("Latency").count("Latency")?),
                download: take("Download").count("Download")?,
                upload: take("Upload").count("Upload")?,
                server_port: take("ServerPort").port("ServerPort")?,
                bare_metal_ssh_port: take("BareMetalSSHPort").port("BareMetalSSHPort")?,
                udp_server_port: take("UDPServerPort").port("UDPServerPort")?,
                nat: take("NAT").flag("NAT")?,
                escape_implementation: take("EscapeImplementation").text("EscapeImplementation")?,
                proxy_server: take("ProxyServer").flag("ProxyServer")?,
                unsafe_mode: take("UnSafeMode").flag("UnSafeMode")?,
                public_key: take("PublicKey").text("PublicKey")?,
                custom_information: take("CustomInformation").text("CustomInformation")?,
            })
        })();
        node.map_err(de::Error::custom)
    }
}

/// The current P2PRC format: ports as strings (empty when unset), booleans as booleans.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeOut<'a> {
    name: &'a str,
    machine_username: &'a str,
    #[serde(rename = "IPV4")]
    ipv4: String,
    #[serde(rename = "IPV6")]
    ipv6: String,
    latency: u64,
    download: u64,
    upload: u64,
    server_port: String,
    #[serde(rename = "UDPServerPort")]
    udp_server_port: String,
    #[serde(rename = "BareMetalSSHPort")]
    bare_metal_ssh_port: String,
    #[serde(rename = "NAT")]
    nat: bool,
    escape_implementation: &'a str,
    proxy_server: bool,
    un_safe_mode: bool,
    public_key: &'a str,
    custom_information: &'a str,
}

fn port_text(port: Option<u16>) -> String {
    port.map(|p| p.to_string()).unwrap_or_default()
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        NodeOut {
            name: self.name.as_str(),
            machine_username: &self.machine_username,
            ipv4: self.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            ipv6: self.ipv6.map(|a| a.to_string()).unwrap_or_default(),
            latency: u64::try_from(self.latency.as_nanos()).unwrap_or(u64::MAX),
            download: self.download,
            upload: self.upload,
            server_port: port_text(self.server_port),
            udp_server_port: port_text(self.udp_server_port),
            bare_metal_ssh_port: port_text(self.bare_metal_ssh_port),
            nat: self.nat,
            escape_implementation: &self.escape_implementation,
            proxy_server: self.proxy_server,
            un_safe_mode: self.unsafe_mode,
            public_key: &self.public_key,
            custom_information: &self.custom_information,
        }
        .serialize(s)
    }
}

fn default_true() -> bool {
    true
}

/// P2PRC's `config.json`, as far as P2F reads it. Unknown fields are ignored; `BareMetal` and
/// `UnsafeMode` default to true, as the seed asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct P2prcConfig {
    /// `MachineName`: this node's name.
    #[serde(default, deserialize_with = "null_as_default")]
    pub machine_name: String,
    /// `IPTable`: path of the IP table.
    #[serde(rename = "IPTable", default, deserialize_with = "null_as_default")]
    pub ip_table: String,
    /// `IPV6Address`.
    #[serde(rename = "IPV6Address", default, deserialize_with = "null_as_default")]
    pub ipv6_address: String,
    /// `ServerPort`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub server_port: String,
    /// `ProxyPort`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub proxy_port: String,
    /// `BehindNAT`.
    #[serde(rename = "BehindNAT", default)]
    pub behind_nat: bool,
    /// `IPTableKey`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ip_table_key: String,
    /// `PublicKeyFile`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub public_key_file: String,
    /// `PrivateKeyFile`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub private_key_file: String,
    /// `PemFile`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub pem_file: String,
    /// `KeyFile`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub key_file: String,
    /// `BareMetal`: run processes on the machine itself (default true).
    #[serde(default = "default_true")]
    pub bare_metal: bool,
    /// `UnsafeMode`: share SSH keys between members (default true).
    #[serde(default = "default_true")]
    pub unsafe_mode: bool,
    /// `Test`.
    #[serde(default)]
    pub test: bool,
    /// `CustomConfig`, verbatim.
    #[serde(default)]
    pub custom_config: serde_json::Value,
    /// `ConfigPath`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub config_path: String,
}

impl Default for P2prcConfig {
    fn default() -> Self {
        P2prcConfig {
            machine_name: String::new(),
            ip_table: String::new(),
            ipv6_address: String::new(),
            server_port: String::new(),
            proxy_port: String::new(),
            behind_nat: false,
            ip_table_key: String::new(),
            public_key_file: String::new(),
            private_key_file: String::new(),
            pem_file: String::new(),
            key_file: String::new(),
            bare_metal: true,
            unsafe_mode: true,
            test: false,
            custom_config: serde_json::Value::Null,
            config_path: String::new(),
        }
    }
}

/// P2PRC's `GET /server_info` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ServerInfo {
    /// `Hostname`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub hostname: String,
    /// `Platform` (e.g. `debian`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub platform: String,
    /// `CPU` model.
    #[serde(rename = "CPU", default, deserialize_with = "null_as_default")]
    pub cpu: String,
    /// `RAM` in MiB.
    #[serde(rename = "RAM", default)]
    pub ram: u64,
    /// `Disk` in MiB.
    #[serde(default)]
    pub disk: u64,
    /// `GPU`, verbatim (`null` when there is none).
    #[serde(rename = "GPU", default)]
    pub gpu: serde_json::Value,
}

/// P2PRC's answer to a port-mapping request: the public address a port is reachable at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MapPortResponse {
    /// `IPAddress`.
    #[serde(rename = "IPAddress", default, deserialize_with = "null_as_default")]
    pub ip_address: String,
    /// `PortNo` (a string in P2PRC).
    #[serde(rename = "PortNo", default, deserialize_with = "null_as_default")]
    pub port_no: String,
    /// `EntireAddress` (`host:port`).
    #[serde(
        rename = "EntireAddress",
        default,
        deserialize_with = "null_as_default"
    )]
    pub entire_address: String,
}
