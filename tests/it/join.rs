//! Joining a cluster: `p2f init` on the root, `p2f node join TOKEN` on a member, and one
//! client (the cluster CA and secret) that reaches both over TLS.

use p2f::model::{ProcessSpec, Status};

use predicates::prelude::PredicateBooleanExt;
use predicates::str::{contains, starts_with};

use crate::support::{TestAgent, p2f_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_with_the_roots_token_and_is_reachable() {
    let root = TestAgent::start("root").await;
    let member = TestAgent::join(&root, "laptop", "127.0.0.2").await;

    // The root's client, with the cluster's CA and secret, reaches the member on another address.
    let at_member = root.network().at(member.network().address());
    assert!(member.network().address().starts_with("127.0.0.2:"));
    let node = at_member.node().await.expect("the member's node entry");
    assert_eq!(node.name.as_str(), "laptop");
    assert_eq!(
        member.config.root.as_deref(),
        root.network()
            .node()
            .await
            .expect("root")
            .api_address()
            .as_deref()
    );
    let spec = ProcessSpec::new("hello", "exec sleep 1000");
    let p = root
        .network()
        .spin_process(&spec, &node)
        .await
        .expect("spin on the member");
    assert_eq!(
        (p.status, p.node.name.as_str()),
        (Status::Running, "laptop")
    );
    assert_eq!(member.os_processes(&p.id), [p.pid.expect("pid")]);

    // A member holds no CA key: it cannot sign other members.
    assert!(!member.config.cluster_dir().join("ca.key").exists());
    let request = p2f::core::join::JoinRequest {
        name: p2f::model::NodeName::from_static("intruder"),
        hosts: vec!["127.0.0.3".into()],
    };
    let refused = at_member
        .join(&request)
        .await
        .expect_err("a member refuses");
    assert_eq!(refused.status(), Some(409), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_clearly() {
    let root = TestAgent::start("root2").await;
    let token = std::fs::read_to_string(root.config.data_dir.join("join-token")).expect("token");
    let dir = tempfile::tempdir().expect("tempdir");
    // A forged token: the right CA and address, a wrong secret.
    let mut forged = p2f::core::join::JoinToken::decode(&token).expect("decode");
    forged.secret = p2f::core::cluster::Secret::generate();
    let cases = [
        ("not-a-token".to_owned(), "not a p2f join token"),
        (
            token.trim()[..token.trim().len() - 12].to_owned(),
            "the join token is damaged",
        ),
        (forged.encode(), "wrong cluster secret"),
    ];
    for (input, says) in cases {
        let join = assert_cmd::Command::new(p2f_bin())
            .args([
                "node",
                "join",
                &input,
                "--name",
                "x",
                "--listen",
                "127.0.0.4:0",
                "--dir",
            ])
            .arg(dir.path().join("node"))
            .timeout(std::time::Duration::from_secs(60))
            .assert()
            .code(1)
            .stderr(starts_with("error: ").and(contains(says)));
        let err = String::from_utf8_lossy(&join.get_output().stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            !dir.path().join("node/node.toml").exists(),
            "nothing written"
        );
    }
}
