//! Joining a cluster: `p2f init` on the root, `p2f node join TOKEN` (or a config naming the
//! root) on a member, and one client (the cluster CA and secret) that reaches both over TLS.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use p2f::core::cluster::{CertRequest, ClusterFiles};
use p2f::core::join::{JoinRequest, JoinToken};
use p2f::model::{NodeName, ProcessSpec, Status};

use predicates::prelude::PredicateBooleanExt;
use predicates::str::{contains, starts_with};

use p2f_testkit::p2f_bin;

use crate::support::{agent, member, root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_with_the_roots_token_and_is_reachable() -> anyhow::Result<()> {
    let root = root("root").await?;
    let member = member(&root, "laptop", "127.0.0.2").await?;

    // The root's client, with the cluster's CA and secret, reaches the member on another address.
    let at_member = root.network().at(member.network().address());
    assert!(member.network().address().starts_with("127.0.0.2:"));
    let node = at_member.node().await.expect("the member's node entry");
    assert_eq!(node.name.as_str(), "laptop");
    assert_eq!(
        member.config().root.as_deref(),
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
    assert_eq!(member.os_copies(&p.id), [p.pid.expect("pid")]);

    // A member holds no CA key: it cannot sign other members.
    assert!(!member.config().cluster_dir().join("ca.key").exists());
    let key = CertRequest::new("intruder").expect("a key");
    let request = JoinRequest {
        name: NodeName::from_static("intruder"),
        hosts: vec!["127.0.0.3".into()],
        csr_pem: key.csr_pem().to_owned(),
    };
    let refused = at_member
        .join(&request)
        .await
        .expect_err("a member refuses");
    assert_eq!(refused.status(), Some(409), "{refused}");

    // The member's key was made on the member: the root signed a request and kept nothing, so
    // the certificate the root answered fits only the key of the request that asked for it.
    let signed = root.network().join(&request).await.expect("the root signs");
    let other = CertRequest::new("intruder").expect("another key");
    assert!(other.complete(signed.cert_pem.clone()).is_err());
    key.complete(signed.cert_pem)
        .expect("the certificate is for this key");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_members_name_is_not_given_twice_and_bad_requests_change_nothing()
-> anyhow::Result<()> {
    let root = root("root3").await?;
    let _member = member(&root, "pi", "127.0.0.3").await?;
    let net = root.network().clone();
    root.hears("pi").await?;

    // Through the CLI: a second "pi", and the root's own name, are refused in one line; nothing
    // is written.
    let token = root.join_token()?;
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["pi", "root3"] {
        let join = assert_cmd::Command::new(p2f_bin()?)
            .args(["node", "join", &token, "--name", name])
            .args(["--listen", "127.0.0.4:0", "--dir"])
            .arg(dir.path().join("node"))
            .timeout(Duration::from_secs(60))
            .assert()
            .code(1)
            .stderr(
                starts_with("error: ")
                    .and(contains(format!("a live node is already called {name}"))),
            );
        let err = String::from_utf8_lossy(&join.get_output().stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!dir.path().join("node").exists(), "nothing written");
    }

    // Through the API: requests that cannot be signed get 422 and a reason.
    let key = CertRequest::new("lan-box").expect("key");
    let cases = [
        ("not a request".to_owned(), "invalid certificate request"),
        (tamper(key.csr_pem()), "invalid certificate request"),
    ];
    for (csr_pem, says) in cases {
        let request = JoinRequest {
            name: NodeName::from_static("lan-box"),
            hosts: vec!["127.0.0.5".into()],
            csr_pem,
        };
        let err = net.join(&request).await.expect_err("refused");
        assert_eq!(err.status(), Some(422), "{err}");
        assert!(err.to_string().contains(says), "{err}");
    }
    // The root still answers, and still knows exactly two nodes.
    let nodes = net.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    Ok(())
}

/// Joining by config (a provisioning tool writes `node.toml` naming the root, next to the
/// cluster's `ca.pem` and `secret`): the first `p2f node run` gets the node's certificate from
/// the root, for a key made on the node, and the node becomes a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_by_config_alone() -> anyhow::Result<()> {
    let root = root("root4").await?;
    let token = JoinToken::decode(&root.join_token()?).expect("token");
    let nas = agent("nas")
        .prepared(|home| {
            ClusterFiles::new(home.join("cluster")).write_member(&token.ca_pem, &token.secret)?;
            let gossip = token.gossip.as_deref().expect("the root gossips");
            let config = format!(
                "name = \"nas\"\nlisten = \"127.0.0.6:0\"\ndata_dir = \".\"\nroot = \"{}\"\n\
                 [mesh]\nlisten = \"127.0.0.6:0\"\nseeds = [\"{gossip}\"]\n",
                token.root
            );
            std::fs::write(home.join("node.toml"), config)?;
            assert!(!home.join("tls").exists());
            Ok(())
        })?
        .started()
        .await?;
    let home = nas.config().data_dir.clone();
    let node = nas
        .network()
        .node()
        .await
        .expect("the member answers over TLS");
    assert_eq!(node.name.as_str(), "nas");
    let key = home.join("tls/node.key");
    let mode = std::fs::metadata(&key)
        .expect("its key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the key is private");
    root.hears("nas").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_clearly() -> anyhow::Result<()> {
    let root = root("root2").await?;
    let token = root.join_token()?;
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
        let join = assert_cmd::Command::new(p2f_bin()?)
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
    Ok(())
}

/// The PEM with one character of its signature (the last base64 line) changed.
fn tamper(pem: &str) -> String {
    let mut lines: Vec<String> = pem.lines().map(str::to_owned).collect();
    let last = lines.len() - 2;
    let flipped: String = lines[last]
        .chars()
        .enumerate()
        .map(|(i, c)| match (i, c) {
            (4, 'A') => 'B',
            (4, _) => 'A',
            _ => c,
        })
        .collect();
    assert_ne!(flipped, lines[last]);
    lines[last] = flipped;
    lines.join("\n") + "\n"
}
