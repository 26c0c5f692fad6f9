//! The root as the one control plane: an unplaced process says why no node took it and can be
//! killed from any node; a deployment given to the root is what places processes.

use std::time::Duration;

use p2f::model::{Failure, NodeName, ProcessSpec, Rejection, Status, Unfit};

use p2f_testkit::eventually;

use crate::support::{member, root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplaced_process_says_why_and_is_killed_through_any_node() -> anyhow::Result<()> {
    let root = root("root").await?;
    let member = member(&root, "member", "127.0.0.6").await?;
    root.all_alive(&["member", "root"]).await?;
    member.all_alive(&["member", "root"]).await?;
    // Pinned to a node that is not in the network.
    let spec =
        ProcessSpec::new("nowhere", "exec sleep 1000").with_pin([NodeName::from_static("ghost")]);
    let desired = root.network().deploy(&[spec]).await.expect("deploy");
    let id = desired.services[0].id.clone();

    let unplaced = member
        .wait_for(
            &id,
            Duration::from_secs(20),
            "the member to list it as unplaced, naming both nodes",
            |p| {
                let rejected = match &p.last_failure {
                    Some(Failure::NoAllowedNode { rejected, .. }) => rejected.len(),
                    _ => 0,
                };
                p.status == Status::Unplaced && rejected == 2
            },
        )
        .await?;
    let pinned_out = |node| Rejection {
        node: NodeName::from_static(node),
        why: Unfit::PinnedOut,
    };
    assert_eq!(
        unplaced.last_failure,
        Some(Failure::NoAllowedNode {
            pins: vec![NodeName::from_static("ghost")],
            rejected: vec![pinned_out("member"), pinned_out("root")],
        })
    );
    assert_eq!(
        unplaced
            .last_failure
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("no node can take it: member is not in its pins, root is not in its pins")
    );

    // Killed through the member: it forwards to the root, which keeps the record stopped.
    let killed = member
        .network()
        .kill_process(&unplaced)
        .await
        .expect("an unplaced process can be killed");
    assert_eq!(killed.status, Status::Stopped, "{killed:?}");
    member
        .wait_for(
            &id,
            Duration::from_secs(20),
            "the member to see it stopped",
            |p| p.status == Status::Stopped,
        )
        .await?;
    // A record that runs nowhere cannot be removed by id: the deployment decides.
    let refused = member
        .network()
        .remove_process(&id)
        .await
        .expect_err("removal goes through the deployment");
    assert_eq!(refused.status(), Some(409), "{refused}");
    // Leaving the deployment forgets it everywhere.
    root.network().deploy(&[]).await.expect("empty deployment");
    eventually("every node to forget it", Duration::from_secs(20), || {
        let (a, b, id) = (root.network().clone(), member.network().clone(), id.clone());
        async move {
            let on_root = a.list_processes().await.ok()?.iter().any(|p| p.id == id);
            let on_member = b.list_processes().await.ok()?.iter().any(|p| p.id == id);
            (!on_root && !on_member).then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_says_its_role_and_only_the_root_takes_a_deployment() -> anyhow::Result<()> {
    use p2f::model::NodeRole;
    let root = root("root").await?;
    let member = member(&root, "member", "127.0.0.7").await?;
    let role = |node: p2f::model::Node| node.p2f_info().and_then(|i| i.role);
    let root_node = root.network().node().await.expect("root's node");
    let member_node = member.network().node().await.expect("member's node");
    assert_eq!(role(root_node), Some(NodeRole::Root));
    assert_eq!(role(member_node), Some(NodeRole::Member));
    let refused = member
        .network()
        .desired()
        .await
        .expect_err("a member has no deployment");
    assert_eq!(refused.status(), Some(409), "{refused}");
    Ok(())
}
