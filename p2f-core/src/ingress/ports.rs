//! Public TCP and UDP ports on the root: each `public:` port of a service is listened on at
//! the ingress's address and forwarded to the target port of the copy that serves now, on
//! whichever node that is, through the same [`Upstream`] as the domains (directly on the root,
//! through a LAN node's agent, or through a NAT'd node's link). Like the route table, the port
//! table is derived from the records on every change: a moved or failed-over process takes its
//! ports along.
//!
//! TCP: each accepted connection is spliced to a new upstream stream. UDP: each client address
//! is a flow with its own upstream stream of framed datagrams (`reach::write_datagram`); a flow
//! ends when its node closes it (idle for two minutes) or the process moves. A connection or
//! datagram that arrives while no copy serves is dropped.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use p2f_model::{Health, Process, Protocol};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::routes::Target;
use super::upstream::Upstream;
use crate::reach::{MAX_DATAGRAM, read_datagram, write_datagram};
use crate::records::Records;
use crate::records::precedence::{self, Candidate, Origin};
use crate::wire::PortRouteInfo;

/// Connections open at once through one public TCP port, at most (more wait to be accepted).
const MAX_CONNECTIONS: usize = 4096;
/// UDP flows (client addresses) at once on one public port, at most; datagrams from new
/// clients beyond it are dropped.
const MAX_FLOWS: usize = 1024;
/// Datagrams queued towards one flow's upstream, at most; more are dropped, as a full network
/// queue drops them.
const FLOW_QUEUE: usize = 256;

/// One public port: protocol and number.
pub type PortKey = (Protocol, u16);

/// A public port's route: the record that counts for it, and the copy that serves it.
#[derive(Debug, Clone)]
pub struct PortRoute {
    /// The record.
    pub process: Arc<Process>,
    /// The copy to forward to (`None` while none serves).
    pub target: Option<Target>,
}

/// Every public port of the records' view.
#[derive(Debug, Clone, Default)]
pub struct PortTable {
    ports: BTreeMap<PortKey, PortRoute>,
}

impl PortTable {
    /// The table of `copies` (every record with its origin): for each public port, the
    /// record that counts (a serving copy first, then precedence).
    pub fn from_copies<'a>(copies: impl IntoIterator<Item = (&'a Arc<Process>, Origin)>) -> Self {
        let mut best: BTreeMap<PortKey, (Arc<Process>, Origin)> = BTreeMap::new();
        for (process, origin) in copies {
            if origin == Origin::Unplaced && process.status.is_final() {
                continue;
            }
            for public in process.spec.public() {
                let key = (public.protocol(), public.public());
                let better = match best.get(&key) {
                    None => true,
                    Some((current, current_origin)) => {
                        match (serves(process).is_some(), serves(current).is_some()) {
                            (true, false) => true,
                            (false, true) => false,
                            _ => precedence::serving_order(
                                &Candidate::of(process, origin),
                                &Candidate::of(current, *current_origin),
                            )
                            .is_lt(),
                        }
                    }
                };
                if better {
                    best.insert(key, (Arc::clone(process), origin));
                }
            }
        }
        let ports = best
            .into_iter()
            .map(|(key, (process, _))| {
                let target = serves(&process).and_then(|_| {
                    let public = process
                        .spec
                        .public()
                        .iter()
                        .find(|p| (p.protocol(), p.public()) == key)?;
                    Some(Target {
                        id: process.id.clone(),
                        generation: process.generation,
                        node: process.node.name.clone(),
                        port: public.target(),
                        protocol: key.0,
                        direct: None,
                    })
                });
                (key, PortRoute { process, target })
            })
            .collect();
        PortTable { ports }
    }

    /// The route of one public port.
    pub fn get(&self, key: &PortKey) -> Option<&PortRoute> {
        self.ports.get(key)
    }

    /// Every public port, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&PortKey, &PortRoute)> {
        self.ports.iter()
    }
}

/// Whether a copy serves: `Running`, and healthy when it has a health check.
fn serves(process: &Process) -> Option<()> {
    let healthy = process.spec.health() == Health::None || process.passed_health_check();
    (process.is_running() && healthy).then_some(())
}

/// The public ports' listeners, following the records.
pub(super) struct PublicPorts {
    table: watch::Receiver<Arc<PortTable>>,
    errors: Arc<Mutex<HashMap<PortKey, String>>>,
    task: JoinHandle<()>,
}

impl PublicPorts {
    /// Listens for every public port of `records` on `ip`, forwarding through `upstream`.
    pub(super) fn start(records: Records, ip: IpAddr, upstream: Arc<dyn Upstream>) -> PublicPorts {
        let (tx, table) = watch::channel(Arc::new(table_of(&records)));
        let errors = Arc::new(Mutex::new(HashMap::new()));
        let task = tokio::spawn(follow(records, tx, ip, upstream, Arc::clone(&errors)));
        PublicPorts {
            table,
            errors,
            task,
        }
    }

    /// What `GET /v1/routes` says of each public port.
    pub(super) fn report(&self, ip: IpAddr, upstream: &dyn Upstream) -> Vec<PortRouteInfo> {
        let table = self.table.borrow().clone();
        let errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        table
            .iter()
            .map(|((protocol, port), route)| PortRouteInfo {
                protocol: *protocol,
                address: SocketAddr::new(ip, *port).to_string(),
                process: route.process.id.clone(),
                service: route.process.name().to_owned(),
                node: route.process.node.name.clone(),
                upstream: route.target.as_ref().map(|t| upstream.describe(t)),
                down: route
                    .target
                    .is_none()
                    .then(|| super::routes::reason(&route.process)),
                error: errors.get(&(*protocol, *port)).cloned(),
            })
            .collect()
    }

    /// Stops listening.
    pub(super) fn stop(&self) {
        self.task.abort();
    }
}

fn table_of(records: &Records) -> PortTable {
    let view = records.view();
    PortTable::from_copies(view.iter().map(|copy| (copy.process(), copy.origin)))
}

/// On every change of the records: the table again, a listener for each new public port, the
/// listeners of ports no longer wanted closed.
async fn follow(
    records: Records,
    table: watch::Sender<Arc<PortTable>>,
    ip: IpAddr,
    upstream: Arc<dyn Upstream>,
    errors: Arc<Mutex<HashMap<PortKey, String>>>,
) {
    let mut listeners: HashMap<PortKey, ListenerTask> = HashMap::new();
    let mut changes = records.changes();
    loop {
        let current = table.borrow().clone();
        listeners.retain(|key, _| current.get(key).is_some());
        errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|key, _| current.get(key).is_some());
        for (key, _) in current.iter() {
            if listeners.contains_key(key) {
                continue;
            }
            let (protocol, port) = *key;
            let listening = match protocol {
                Protocol::Tcp => {
                    listen_tcp(ip, port, *key, table.subscribe(), upstream.clone()).await
                }
                Protocol::Udp => {
                    listen_udp(ip, port, *key, table.subscribe(), upstream.clone()).await
                }
            };
            let mut errors = errors.lock().unwrap_or_else(PoisonError::into_inner);
            match listening {
                Ok(task) => {
                    errors.remove(key);
                    tracing::info!(%protocol, %ip, port, "public port open");
                    listeners.insert(*key, ListenerTask(task));
                }
                Err(e) => {
                    // Tried again at the next change of the records; said once per reason.
                    let why = format!("cannot listen on {protocol} {ip}:{port}: {e}");
                    if errors.get(key) != Some(&why) {
                        tracing::warn!("{why}");
                    }
                    errors.insert(*key, why);
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
        let _ = table.send(Arc::new(table_of(&records)));
    }
}

/// A listener's task, aborted when dropped.
struct ListenerTask(JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn listen_tcp(
    ip: IpAddr,
    port: u16,
    key: PortKey,
    table: watch::Receiver<Arc<PortTable>>,
    upstream: Arc<dyn Upstream>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind((ip, port)).await?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (mut client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!("public TCP port {port}: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let target = table.borrow().get(&key).and_then(|r| r.target.clone());
            let upstream = Arc::clone(&upstream);
            tokio::spawn(async move {
                let _slot = slot;
                let Some(target) = target else {
                    return;
                };
                let _ = client.set_nodelay(true);
                match upstream.connect(&target).await {
                    Ok(mut stream) => {
                        let _ = crate::reach::splice(&mut client, &mut stream).await;
                    }
                    Err(e) => tracing::debug!(%peer, port, "public TCP port: {e}"),
                }
            });
        }
    }))
}

async fn listen_udp(
    ip: IpAddr,
    port: u16,
    key: PortKey,
    table: watch::Receiver<Arc<PortTable>>,
    upstream: Arc<dyn Upstream>,
) -> std::io::Result<JoinHandle<()>> {
    let socket = Arc::new(UdpSocket::bind((ip, port)).await?);
    Ok(tokio::spawn(async move {
        let flows: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>> = Arc::default();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(e) => {
                    tracing::debug!("public UDP port {port}: {e}");
                    continue;
                }
            };
            let datagram = buf[..n].to_vec();
            let mut open = flows.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(flow) = open.get(&peer) {
                // A full queue drops the datagram, as a full network queue would.
                let _ = flow.try_send(datagram);
                continue;
            }
            let Some(target) = table.borrow().get(&key).and_then(|r| r.target.clone()) else {
                continue;
            };
            if open.len() >= MAX_FLOWS {
                continue;
            }
            let (tx, rx) = mpsc::channel(FLOW_QUEUE);
            let _ = tx.try_send(datagram);
            open.insert(peer, tx);
            drop(open);
            let (socket, upstream, flows) = (
                Arc::clone(&socket),
                Arc::clone(&upstream),
                Arc::clone(&flows),
            );
            tokio::spawn(async move {
                if let Err(e) = flow(&socket, peer, rx, upstream.as_ref(), &target).await {
                    tracing::debug!(%peer, port, "public UDP flow: {e}");
                }
                flows
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&peer);
            });
        }
    }))
}

/// One UDP client's flow: its datagrams to the upstream as frames, the frames back to it.
async fn flow(
    socket: &UdpSocket,
    peer: SocketAddr,
    mut from_client: mpsc::Receiver<Vec<u8>>,
    upstream: &dyn Upstream,
    target: &Target,
) -> std::io::Result<()> {
    let stream = upstream
        .connect(target)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (mut read, mut write) = tokio::io::split(stream);
    let to_node = async {
        while let Some(datagram) = from_client.recv().await {
            write_datagram(&mut write, &datagram).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let to_client = async {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Some(n) = read_datagram(&mut read, &mut buf).await? {
            socket.send_to(&buf[..n], peer).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        r = to_node => r,
        r = to_client => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2f_model::{NodeName, NodeRef, ProcessId, ProcessSpec, PublicPort, Status, Timestamp};

    fn game(node: &str, generation: u64, status: Status) -> Arc<Process> {
        let spec = ProcessSpec::new("game", "true").with_public([
            PublicPort::tcp(25565),
            PublicPort::new(Protocol::Udp, 19132, 19133),
        ]);
        let node = NodeRef {
            name: NodeName::new(node).expect("node"),
            address: "127.0.0.1".into(),
        };
        let id = ProcessId::new("game").expect("id");
        let mut process = Process::placed(id, generation, spec, node, Timestamp(1));
        process.status = status;
        Arc::new(process)
    }

    #[test]
    fn each_public_port_goes_to_the_copy_that_serves() {
        let old = game("pi", 1, Status::Lost);
        let new = game("nas", 2, Status::Running);
        let table = PortTable::from_copies([(&old, Origin::Remote), (&new, Origin::Remote)]);
        let tcp = table.get(&(Protocol::Tcp, 25565)).expect("tcp");
        let target = tcp.target.clone().expect("serves");
        assert_eq!(
            (target.node.as_str(), target.port, target.generation),
            ("nas", 25565, 2)
        );
        let udp = table.get(&(Protocol::Udp, 19132)).expect("udp");
        let target = udp.target.clone().expect("serves");
        assert_eq!((target.port, target.protocol), (19133, Protocol::Udp));
        assert!(table.get(&(Protocol::Tcp, 19132)).is_none());
    }

    #[test]
    fn a_port_whose_copy_does_not_serve_has_no_target() {
        let starting = game("pi", 1, Status::Pending);
        let table = PortTable::from_copies([(&starting, Origin::Local)]);
        let route = table.get(&(Protocol::Tcp, 25565)).expect("listed");
        assert!(route.target.is_none());
        assert_eq!(route.process.node.name.as_str(), "pi");
    }
}
