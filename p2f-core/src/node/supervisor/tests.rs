//! The registry's decisions as a table, and the supervisor itself over a store in a temp dir
//! with real short `sh -c` processes (every wait bounded).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use p2f_model::{Failure, Health, NodeName, RestartPolicy};

use super::*;
use crate::store::Local;

/// The longest any test waits for a process to get somewhere.
const WAIT: Duration = Duration::from_secs(10);

fn node() -> NodeRef {
    NodeRef {
        name: NodeName::from_static("n1"),
        address: "127.0.0.1".into(),
    }
}

fn id(service: &str, n: u64) -> ProcessId {
    ProcessId::for_service(service, n)
}

fn record(id: &ProcessId, generation: u64, spec: &ProcessSpec, status: Status) -> Process {
    let mut process = Process::placed(id.clone(), generation, spec.clone(), node(), Timestamp(1));
    process.status = status;
    process
}

fn registry(slots: &[Process], placing: &[Process]) -> Registry {
    let mut registry = Registry::default();
    for process in slots {
        let entry = Entry {
            process: process.clone(),
            local: None,
        };
        let runner = if process.status == Status::Parked {
            Runner::Parked
        } else {
            Runner::Idle
        };
        let slot = Slot::new(entry, watch::channel(Desired::Run).0, runner);
        registry.slots.insert(process.id.clone(), slot);
    }
    for process in placing {
        let writing = Writing::Placing(Box::new(process.clone()));
        registry.writing.insert(process.id.clone(), writing);
    }
    registry
}

#[test]
fn a_spin_meets_the_existing_record_a_conflict_or_a_new_generation() {
    let (a, b) = (id("web", 1), id("api", 2));
    let web = ProcessSpec::new("web", "exec sleep 30").with_port(8080);
    let api = ProcessSpec::new("api", "exec sleep 30").with_port(8080);
    let running = record(&a, 2, &web, Status::Running);
    let stopped = record(&a, 2, &web, Status::Stopped);
    let parked = record(&a, 2, &web, Status::Parked);
    let failed = record(&a, 1, &web, Status::Failed(Failure::Exited { code: 1 }));
    let placing = record(&a, 1, &web, Status::Pending);
    let exists = |status: Status| SupervisorError::Exists {
        id: a.clone(),
        status,
    };
    let port_taken = SupervisorError::PortTaken {
        port: 8080,
        by: a.clone(),
        service: "web".into(),
    };
    let new = |generation| Ok(Admission::New { generation });
    let check = |registry: &Registry,
                 id: &ProcessId,
                 spec: &ProcessSpec,
                 generation: Option<u64>,
                 want: Result<Admission, SupervisorError>| {
        let got = registry.admit(id, spec, generation);
        // `SupervisorError` holds errors without `PartialEq`; its `Debug` shows variant and data.
        assert_eq!(
            format!("{got:?}"),
            format!("{want:?}"),
            "{id} {generation:?}"
        );
    };
    let here = registry(std::slice::from_ref(&running), &[]);
    check(
        &here,
        &a,
        &web,
        Some(2),
        Ok(Admission::Existing(Box::new(running.clone()))),
    );
    check(&here, &a, &web, None, Err(exists(Status::Running)));
    check(
        &here,
        &a,
        &web.with_start("exec sleep 31"),
        Some(2),
        Err(exists(Status::Running)),
    );
    check(&here, &b, &api, Some(1), Err(port_taken));
    check(&here, &b, &api.with_port(8081), Some(1), new(1));
    let ended = registry(&[stopped], &[]);
    check(&ended, &a, &web, None, new(3));
    check(&ended, &a, &web, Some(7), new(7));
    check(&ended, &b, &api, None, new(1));
    let waiting = registry(std::slice::from_ref(&parked), &[]);
    check(
        &waiting,
        &a,
        &web,
        Some(2),
        Ok(Admission::Existing(Box::new(parked))),
    );
    check(&waiting, &a, &web, Some(3), Err(exists(Status::Parked)));
    let in_flight = registry(&[], &[placing]);
    check(
        &in_flight,
        &b,
        &api,
        None,
        Err(SupervisorError::PortTaken {
            port: 8080,
            by: a.clone(),
            service: "web".into(),
        }),
    );
    let gave_up = registry(&[failed], &[]);
    check(&gave_up, &a, &web, None, new(2));
    check(&registry(&[], &[]), &a, &web, None, new(1));
}

#[test]
fn a_slot_is_parked_only_while_no_write_about_it_runs() {
    let a = id("web", 1);
    let spec = ProcessSpec::new("web", "true");
    let mut registry = registry(&[record(&a, 1, &spec, Status::Parked)], &[]);
    assert!(registry.is_parked(&a));
    registry.writing.insert(a.clone(), Writing::Changing);
    assert!(!registry.is_parked(&a));
    assert!(!registry.is_parked(&id("other", 2)));
}

#[test]
fn the_conflicts_say_which_in_one_line() {
    let a = id("web", 1);
    let cases = [
        (
            SupervisorError::Exists {
                id: a.clone(),
                status: Status::Parked,
            },
            format!("process {a} is parked here; kill it first"),
        ),
        (
            SupervisorError::PortTaken {
                port: 80,
                by: a.clone(),
                service: "web".into(),
            },
            format!("port 80 is used by {a} (web) on this node"),
        ),
        (
            SupervisorError::StartedAgain { id: a.clone() },
            format!("process {a} was started again while it was being removed"),
        ),
    ];
    for (error, text) in cases {
        assert_eq!(error.to_string(), text);
    }
}

fn start(dir: &Path, store: Arc<Store>, recovery: Recovery) -> Supervisor {
    let deploy = DeployOptions {
        timeout: Duration::from_secs(60),
        ..DeployOptions::default()
    };
    let settings = SupervisorConfig::default();
    Supervisor::start(node(), store, dir, settings, deploy, recovery).expect("supervisor")
}

fn open_store(dir: &Path) -> Arc<Store> {
    Arc::new(Store::open(&dir.join("records.redb")).expect("store"))
}

/// A port nobody listens on (released before use: only this test uses it).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn sleeper(name: &str) -> ProcessSpec {
    ProcessSpec::new(name, "exec sleep 30").with_health(Health::None)
}

#[tokio::test]
async fn a_spin_answers_the_same_record_again_and_refuses_conflicts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    let supervisor = start(dir.path(), store.clone(), Recovery::Restart);
    let port = free_port();
    let web = sleeper("web").with_port(port);
    let placed = supervisor.spin(web.clone(), None, None).expect("spin");
    let id = placed.id.clone();
    let on_disk = store.get(&id).expect("read").expect("a record on disk");
    assert_eq!(on_disk.process.generation, 1);
    let running = supervisor
        .wait_for(&id, WAIT, Process::is_running)
        .await
        .expect("record");
    assert!(running.is_running(), "{running:?}");
    let pid = running.pid.expect("pid");

    let again = supervisor
        .spin(web.clone(), Some(id.clone()), Some(1))
        .expect("same");
    assert_eq!((again.generation, again.pid), (1, Some(pid)));
    let other = web.with_start("exec sleep 31");
    match supervisor.spin(other, Some(id.clone()), Some(1)) {
        Err(SupervisorError::Exists { id: got, status }) => {
            assert_eq!((got, status), (id.clone(), Status::Running));
        }
        other => panic!("expected Exists, got {other:?}"),
    }
    match supervisor.spin(sleeper("api").with_port(port), None, None) {
        Err(SupervisorError::PortTaken {
            port: p,
            by,
            service,
        }) => {
            assert_eq!((p, by, service.as_str()), (port, id.clone(), "web"));
        }
        other => panic!("expected PortTaken, got {other:?}"),
    }
    assert_eq!(supervisor.len(), 1, "a refused spin leaves nothing behind");

    let killed = supervisor.kill(&id).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    assert!(!os::group_alive(pid), "its process group is gone");
    let again = supervisor
        .spin(web, Some(id.clone()), None)
        .expect("spin again");
    assert_eq!(again.generation, 2, "above the stopped one");
    supervisor.remove(&id).await.expect("remove");
    assert_eq!(supervisor.find(&ProcessKey::Id(id.clone())), None);
    assert!(store.get(&id).expect("read").is_none());
    supervisor.shutdown(Shutdown::StopAll).await;
}

#[tokio::test]
async fn a_parked_record_says_so_and_is_stopped_where_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    let (waits, ran) = (id("waits", 1), id("ran", 2));
    let pending = record(&waits, 4, &sleeper("waits"), Status::Pending);
    let mut running = record(&ran, 1, &sleeper("ran"), Status::Pending);
    lifecycle::on_started(&mut running, u32::MAX - 1, Timestamp(2));
    let gone = Local {
        pgid: u32::MAX - 1,
        start_ticks: 1,
        relay: 0,
        relay_ticks: 0,
    };
    for (process, local) in [(pending, None), (running, Some(gone))] {
        store.put(&Entry { process, local }).expect("put");
    }
    let supervisor = start(dir.path(), store.clone(), Recovery::Park);
    for id in [&waits, &ran] {
        assert!(supervisor.is_parked(id));
        let stored = store.get(id).expect("read").expect("record");
        assert_eq!(stored.process.status, Status::Parked, "{id}");
    }
    let vanished = supervisor.find(&ProcessKey::Id(ran.clone())).expect("ran");
    assert_eq!(vanished.last_failure, Some(Failure::Vanished));

    let killed = supervisor.kill(&waits).await.expect("kill");
    assert_eq!(killed.status, Status::Stopped);
    assert!(!supervisor.is_parked(&waits));
    let stored = store.get(&waits).expect("read").expect("record");
    assert_eq!(stored.process.status, Status::Stopped);
    // Unparking later does not start it.
    supervisor.unpark(|_| None);
    let after = supervisor
        .find(&ProcessKey::Id(waits.clone()))
        .expect("record");
    assert_eq!(after.status, Status::Stopped);
    assert!(
        os::find_by_env(waits.as_str(), 4).is_empty(),
        "never started"
    );
    supervisor.shutdown(Shutdown::StopAll).await;
}

#[tokio::test]
async fn unpark_starts_what_was_not_replaced_and_forgets_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_store(dir.path());
    let (kept, replaced) = (id("kept", 1), id("replaced", 2));
    for (id, name) in [(&kept, "kept"), (&replaced, "replaced")] {
        let process = record(id, 3, &sleeper(name), Status::Pending);
        store
            .put(&Entry {
                process,
                local: None,
            })
            .expect("put");
    }
    let supervisor = start(dir.path(), store.clone(), Recovery::Park);
    supervisor.unpark(|p| (p.id == replaced).then(|| "newer elsewhere".to_owned()));
    assert!(!supervisor.is_parked(&kept), "its task started");
    assert_eq!(supervisor.find(&ProcessKey::Id(replaced.clone())), None);
    assert!(store.get(&replaced).expect("read").is_none());
    let running = supervisor
        .wait_for(&kept, WAIT, Process::is_running)
        .await
        .expect("record");
    assert!(running.is_running(), "{running:?}");
    assert!(!supervisor.is_parked(&kept));
    // The forgotten id is free again.
    let spun = supervisor.spin(sleeper("replaced"), Some(replaced.clone()), Some(4));
    assert_eq!(spun.expect("spin").generation, 4);
    supervisor.shutdown(Shutdown::StopAll).await;
    let stopped = supervisor.find(&ProcessKey::Id(kept)).expect("record");
    assert_eq!(stopped.status, Status::Stopped);
}

#[tokio::test]
async fn exits_follow_the_policy_and_shutdown_admits_no_more_spins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let supervisor = start(dir.path(), open_store(dir.path()), Recovery::Restart);
    let never =
        |name: &str, start: &str| ProcessSpec::new(name, start).with_restart(RestartPolicy::Never);
    let failing = supervisor
        .spin(never("failing", "exit 3"), None, None)
        .expect("spin");
    let clean = supervisor
        .spin(never("clean", "true"), None, None)
        .expect("spin");
    let ended = |p: &Process| p.status.is_final();
    let failed = supervisor
        .wait_for(&failing.id, WAIT, ended)
        .await
        .expect("record");
    assert_eq!(failed.status, Status::Failed(Failure::Exited { code: 3 }));
    let done = supervisor
        .wait_for(&clean.id, WAIT, ended)
        .await
        .expect("record");
    assert_eq!(done.status, Status::Stopped);

    let sleeping = supervisor
        .spin(sleeper("sleeping"), None, None)
        .expect("spin");
    supervisor
        .wait_for(&sleeping.id, WAIT, Process::is_running)
        .await
        .expect("record");
    supervisor.shutdown(Shutdown::StopAll).await;
    let stopped = supervisor
        .find(&ProcessKey::Id(sleeping.id))
        .expect("record");
    assert_eq!(stopped.status, Status::Stopped);
    let refused = supervisor.spin(sleeper("late"), None, None);
    assert!(
        matches!(refused, Err(SupervisorError::ShuttingDown)),
        "{refused:?}"
    );
}
