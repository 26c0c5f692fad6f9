//! The table exchange with known P2PRC peers, the way P2PRC gossips: every
//! `[p2prc] gossip_interval`, this node posts its table to a few known peers' `/IpTable`
//! and merges their answers into the known peers (never into anything else). Bounded: at most
//! [`PER_ROUND`] peers a round, taken in turn, each call within [`CALL_TIMEOUT`], each answer
//! read up to [`super::api::MAX_TABLE_BYTES`].

use std::time::Duration;

use futures_util::StreamExt as _;
use p2f_model::IpTable;

use super::api::{MAX_TABLE_BYTES, P2prcApi};
use super::peers::P2prcPeer;

/// Peers called per round.
pub const PER_ROUND: usize = 8;
/// The longest one exchange may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The peer has no address or no server port.
    #[error("no address or server port")]
    Unreachable,
    /// The call failed.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// The peer answered with an error status.
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    /// The answer is larger than a table may be.
    #[error("the answer is larger than {} KiB", MAX_TABLE_BYTES >> 10)]
    TooLarge,
    /// The answer is not an IP table.
    #[error("the answer is not an IP table: {0}")]
    Table(#[from] serde_json::Error),
}

/// The `http://HOST:PORT` of a peer's P2PRC API.
pub fn base_url(peer: &P2prcPeer) -> Option<String> {
    let port = peer.node.server_port?;
    match (peer.node.ipv4, peer.node.ipv6) {
        (Some(v4), _) => Some(format!("http://{v4}:{port}")),
        (None, Some(v6)) => Some(format!("http://[{v6}]:{port}")),
        (None, None) => None,
    }
}

/// Posts `table` to `base`'s `/IpTable` as P2PRC does (a file part `json`) and reads the
/// table it answers with.
pub async fn exchange(
    client: &reqwest::Client,
    base: &str,
    table: &IpTable,
) -> Result<IpTable, ExchangeError> {
    let json = serde_json::to_vec(table)?;
    let part = reqwest::multipart::Part::bytes(json)
        .file_name("ip_table.json")
        .mime_str("application/json")?;
    let form = reqwest::multipart::Form::new().part("json", part);
    let response = client
        .post(format!("{base}/IpTable"))
        .multipart(form)
        .timeout(CALL_TIMEOUT)
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(ExchangeError::Status(response.status()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_TABLE_BYTES as u64)
    {
        return Err(ExchangeError::TooLarge);
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > MAX_TABLE_BYTES {
            return Err(ExchangeError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Exchanges tables with known peers every `interval`, forever (aborted with the agent).
pub async fn run(api: P2prcApi, client: reqwest::Client, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut turn = 0usize;
    loop {
        ticker.tick().await;
        let peers = api.peers().list();
        if peers.is_empty() {
            continue;
        }
        let table = api.table();
        for i in 0..PER_ROUND.min(peers.len()) {
            let peer = &peers[(turn + i) % peers.len()];
            let name = peer.node.name.clone();
            let result = match base_url(peer) {
                Some(base) => exchange(&client, &base, &table).await,
                None => Err(ExchangeError::Unreachable),
            };
            match result {
                Ok(answer) => {
                    if let Err(e) = api.learn(&answer, &format!("exchange with {name}")) {
                        tracing::debug!(peer = %name, "P2PRC table not taken: {}", e.body.error);
                    }
                }
                Err(e) => tracing::debug!(peer = %name, "P2PRC table exchange failed: {e}"),
            }
        }
        turn = turn.wrapping_add(PER_ROUND);
    }
}
