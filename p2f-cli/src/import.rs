//! `p2f p2prc import`: an existing P2PRC machine into this P2F node. Its `config.json` gives
//! the node's `[p2prc]` section (P2PRC's API port, the SSH key) and `bare_metal`/`unsafe_mode`;
//! its IP table gives known P2PRC peers (never members). Says what it took and what it could
//! not, and why.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use p2f_core::node::AgentConfig;
use p2f_core::p2prc::{Peers, peers_path};
use p2f_model::{IpTable, P2prcConfig};

/// What an import did.
#[derive(Debug, Default)]
pub struct Imported {
    /// What was taken, one line each.
    pub took: Vec<String>,
    /// What was not, one line each with why.
    pub left: Vec<String>,
}

/// Reads a P2PRC file as JSON, naming it in errors.
fn read<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a P2PRC {what}", path.display()))
}

/// Imports into the node configured by `node_toml` (made by `p2f init` or `p2f node join`):
/// `config` (P2PRC's `config.json`) and `table` (an IP table; default: the one `config`
/// names, when it exists). The node's config is written again only when `config` is given.
pub fn import(node_toml: &Path, config: Option<&Path>, table: Option<&Path>) -> Result<Imported> {
    if config.is_none() && table.is_none() {
        bail!("nothing to import: pass --config config.json and/or --ip-table ip_table.json");
    }
    if !node_toml.exists() {
        bail!(
            "{} does not exist: make this machine a node first (`p2f init`, or `p2f node join`; \
             pass --name with the P2PRC machine name to keep it), then import",
            node_toml.display()
        );
    }
    // Written back as it was written (relative paths stay relative); read as the agent reads it.
    let text = std::fs::read_to_string(node_toml)
        .with_context(|| format!("cannot read {}", node_toml.display()))?;
    let mut node = AgentConfig::parse(&text)
        .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", node_toml.display()))?;
    let data_dir = AgentConfig::load(node_toml)?.data_dir;
    let mut done = Imported::default();
    let mut table_path = table.map(Path::to_owned);
    if let Some(path) = config {
        let p2prc: P2prcConfig = read(path, "config.json")?;
        take_config(&mut node, &p2prc, &mut done);
        if table_path.is_none() && !p2prc.ip_table.is_empty() {
            let named = PathBuf::from(&p2prc.ip_table);
            if named.exists() {
                table_path = Some(named);
            } else {
                done.left.push(format!(
                    "IPTable {}: no such file (pass --ip-table)",
                    p2prc.ip_table
                ));
            }
        }
        // Whole or not at all.
        let text = toml_of(&node)?;
        p2f_core::fsutil::write_atomic(node_toml, text, 0o644)?;
    }
    if let Some(path) = table_path {
        let table: IpTable = read(&path, "IP table")?;
        take_table(&node, &data_dir, &table, &mut done)?;
    }
    Ok(done)
}

fn toml_of(node: &AgentConfig) -> Result<String> {
    let text = node.to_toml();
    // What is written must read back: never leave a node that cannot start.
    AgentConfig::parse(&text).map_err(|e| anyhow::anyhow!("the new config is invalid: {e}"))?;
    Ok(text)
}

/// `config.json` into the node's config.
fn take_config(node: &mut AgentConfig, p2prc: &P2prcConfig, done: &mut Imported) {
    let mut settings = node.p2prc.clone().unwrap_or_default();
    if p2prc.machine_name.is_empty() || p2prc.machine_name == node.name.as_str() {
        done.took.push(format!("MachineName {}", node.name));
    } else {
        done.left.push(format!(
            "MachineName {}: this node is named {} (its certificate names it; join with --name {} to keep P2PRC's name)",
            p2prc.machine_name, node.name, p2prc.machine_name
        ));
    }
    match p2prc.server_port.trim().parse::<u16>() {
        Ok(port) if port > 0 => {
            let ip = node.listen.ip();
            settings.listen = Some((ip, port).into());
            done.took.push(format!(
                "ServerPort {port}: P2PRC's API on http://{ip}:{port} ([p2prc] listen)"
            ));
        }
        _ if p2prc.server_port.is_empty() => {}
        _ => done.left.push(format!(
            "ServerPort {:?}: not a port number",
            p2prc.server_port
        )),
    }
    node.bare_metal = p2prc.bare_metal;
    node.unsafe_mode = p2prc.unsafe_mode;
    done.took.push(format!(
        "BareMetal {}, UnsafeMode {} (members' SSH keys {} authorized_keys)",
        p2prc.bare_metal,
        p2prc.unsafe_mode,
        if p2prc.unsafe_mode {
            "kept in"
        } else {
            "not in"
        }
    ));
    if !p2prc.public_key_file.is_empty() {
        let path = PathBuf::from(&p2prc.public_key_file);
        match std::fs::read_to_string(&path) {
            Ok(text) if p2f_core::ssh_keys::block::key_line("x", &text).is_ok() => {
                settings.ssh_public_key = Some(path);
                done.took.push(format!(
                    "PublicKeyFile {}: the node's SSH key ([p2prc] ssh_public_key)",
                    p2prc.public_key_file
                ));
            }
            Ok(_) => done.left.push(format!(
                "PublicKeyFile {}: not an OpenSSH public key (P2F makes one for the node)",
                p2prc.public_key_file
            )),
            Err(e) => done.left.push(format!(
                "PublicKeyFile {}: {e} (P2F makes a key for the node)",
                p2prc.public_key_file
            )),
        }
    }
    if p2prc.behind_nat {
        done.left.push(
            "BehindNAT true: P2F reaches members behind NAT through the root's relay, set up by joining"
                .into(),
        );
    }
    if !p2prc.proxy_port.is_empty() {
        done.left.push(format!(
            "ProxyPort {}: domains are served by the root's ingress ([ingress] in its node.toml)",
            p2prc.proxy_port
        ));
    }
    if !p2prc.ipv6_address.is_empty() {
        done.left.push(format!(
            "IPV6Address {}: set `advertise` in node.toml if others should reach this node there",
            p2prc.ipv6_address
        ));
    }
    node.p2prc = Some(settings);
}

/// An IP table into the node's known P2PRC peers.
fn take_table(
    node: &AgentConfig,
    data_dir: &Path,
    table: &IpTable,
    done: &mut Imported,
) -> Result<()> {
    for skipped in &table.skipped {
        done.left.push(format!("table {skipped}"));
    }
    let peers = Peers::load(peers_path(data_dir));
    let own = node.name.clone();
    let merged = peers.merge(&table.ip_address, &|name| *name == own, "import")?;
    for name in merged.added.iter().chain(&merged.updated) {
        done.took.push(format!("peer {name} (known, not a member)"));
    }
    for (name, why) in &merged.refused {
        done.left.push(format!("peer {name}: {why}"));
    }
    Ok(())
}
