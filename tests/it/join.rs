//! Joining a cluster and who may do what: `p2f init` on the root, `p2f node token` there,
//! `p2f node join --token-file` (or a config naming the root and a token file) on a member;
//! every call authorized by its client certificate (root, member, operator).

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use p2f::core::cluster::CertRequest;
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

    // The root's client (the operator's certificate) reaches the member on another address.
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
        token: JoinToken::decode(&root.join_token()?)?.secret,
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
            .env("P2F_JOIN_TOKEN", &token)
            .args(["node", "join", "--name", name])
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
            token: JoinToken::decode(&token)?.secret,
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

/// Joining by config (a provisioning tool writes `node.toml` naming the root, and a join token
/// in `cluster/join-token`): the first `p2f node run` gets the node's certificate and the
/// gossip secret from the root, for a key made on the node, and the node becomes a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_by_config_alone() -> anyhow::Result<()> {
    let root = root("root4").await?;
    let text = root.join_token()?;
    let token = JoinToken::decode(&text).expect("token");
    let nas = agent("nas")
        .prepared(|home| {
            std::fs::create_dir_all(home.join("cluster"))?;
            std::fs::write(home.join("cluster/join-token"), &text)?;
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
    assert!(
        !home.join("cluster/join-token").exists(),
        "the used token is removed"
    );
    assert!(
        home.join("cluster/secret").exists(),
        "the gossip secret came with the join"
    );
    root.hears("nas").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_clearly() -> anyhow::Result<()> {
    let root = root("root2").await?;
    let token = root.join_token()?;
    let dir = tempfile::tempdir().expect("tempdir");
    // A forged token: the right CA and address, a secret the root never made.
    let mut forged = JoinToken::decode(&token).expect("decode");
    forged.secret = "ab".repeat(32);
    // A token that a join has used, and (below) one that expires at once.
    let used = root.join_token()?;
    let joined = assert_cmd::Command::new(p2f_bin()?)
        .env("P2F_JOIN_TOKEN", &used)
        .args([
            "node",
            "join",
            "--name",
            "first",
            "--listen",
            "127.0.0.7:0",
            "--dir",
        ])
        .arg(dir.path().join("first"))
        .timeout(Duration::from_secs(60))
        .assert();
    joined.success();
    // Each refused with its own message. The root forgets spent and expired tokens whenever
    // it writes its token book (a join, a new token), so the spent one is tried before the
    // expired one is made, and the expired one right after its second is over.
    let refused = |input: &str, says: &str| -> anyhow::Result<()> {
        // From a file, as `--token-file` takes it; stdin and the environment are tried below.
        let file = dir.path().join("token");
        std::fs::write(&file, input)?;
        let join = assert_cmd::Command::new(p2f_bin()?)
            .args(["node", "join", "--token-file"])
            .arg(&file)
            .args(["--name", "x", "--listen", "127.0.0.4:0", "--dir"])
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
        Ok(())
    };
    refused(&used, "already used")?;
    refused("not-a-token", "not a p2f join token")?;
    refused(
        &token.trim()[..token.trim().len() - 12],
        "the join token is damaged",
    )?;
    refused(&forged.encode(), "unknown join token")?;
    let expired = root.join_token_with(&["--ttl", "1s"])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    refused(&expired, "expired")?;
    // No token at all: the message says where one comes from; none is taken from the command
    // line (`p2f node join TOKEN` is a usage error).
    assert_cmd::Command::new(p2f_bin()?)
        .env_remove("P2F_JOIN_TOKEN")
        .args(["node", "join", "--name", "x", "--dir"])
        .arg(dir.path().join("node"))
        .timeout(Duration::from_secs(60))
        .assert()
        .code(1)
        .stderr(contains("--token-file").and(contains("p2f node token")));
    assert_cmd::Command::new(p2f_bin()?)
        .args(["node", "join", &token, "--dir"])
        .arg(dir.path().join("node"))
        .timeout(Duration::from_secs(60))
        .assert()
        .code(2);
    // The good token, from stdin, still works (failed joins spent nothing).
    assert_cmd::Command::new(p2f_bin()?)
        .args(["node", "join", "--token-file", "-", "--name", "second"])
        .args(["--listen", "127.0.0.8:0", "--dir"])
        .arg(dir.path().join("second"))
        .write_stdin(token.clone())
        .timeout(Duration::from_secs(60))
        .assert()
        .success();
    Ok(())
}

/// Who may do what (issue: trust): a member's own certificate reads everything and acts on its
/// own node and its own processes, and nothing else; an operator's does everything; no
/// certificate gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_may_read_but_not_act_on_other_nodes() -> anyhow::Result<()> {
    use p2f::core::wire::{SpinQuery, SpinRequest, TokenRequest};
    let root = root("root5").await?;
    let a = member(&root, "node-a", "127.0.0.2").await?;
    let b = member(&root, "node-b", "127.0.0.3").await?;
    root.all_alive(&["node-a", "node-b", "root5"]).await?;
    let as_a = p2f::core::Network::connect(a.network().address(), &a.node_credentials()?)?;
    let a_at = |agent: &p2f_testkit::Agent| as_a.at(agent.network().address());
    fn status<T>(r: Result<T, p2f::core::ClientError>) -> Option<u16> {
        r.err().and_then(|e| e.status())
    }
    let spin = |name: &str| SpinRequest {
        spec: ProcessSpec::new(name, "exec sleep 1000"),
        id: None,
        generation: None,
        moved_from: None,
        external: None,
    };

    // Reads: anywhere.
    assert!(a_at(&b).list_processes().await.is_ok());
    assert!(a_at(&root).nodes().await.is_ok());
    // Spinning on another node, the deployment, join tokens: 403.
    assert_eq!(
        status(a_at(&b).spin(&spin("sneaky"), SpinQuery::default()).await),
        Some(403)
    );
    assert_eq!(status(a_at(&root).deploy(&[]).await), Some(403));
    assert_eq!(
        status(a_at(&root).join_token(&TokenRequest::default()).await),
        Some(403)
    );
    // Its own node: allowed.
    let own = as_a.spin(&spin("own"), SpinQuery { wait: true }).await?;
    assert_eq!(own.node.name.as_str(), "node-a");
    // A process of node-b (placed by the operator): a may not kill it, even through the root.
    let theirs = root
        .network()
        .at(b.network().address())
        .spin(&spin("theirs"), SpinQuery { wait: true })
        .await?;
    root.wait_for(
        &theirs.id,
        Duration::from_secs(10),
        "known to the root",
        |_| true,
    )
    .await?;
    assert_eq!(status(a_at(&root).kill_process(&theirs).await), Some(403));
    assert_eq!(status(a_at(&b).kill_process(&theirs).await), Some(403));
    // Its own process through the root: allowed (the root forwards it to node-a).
    root.wait_for(
        &own.id,
        Duration::from_secs(10),
        "known to the root",
        |_| true,
    )
    .await?;
    let killed = a_at(&root).kill_process(&own).await?;
    assert_eq!(killed.status, Status::Stopped);
    // The process of node-b still runs; the operator may stop it.
    let record = root
        .network()
        .process_information(p2f::model::ProcessKey::Id(theirs.id.clone()))
        .await?
        .expect("record");
    assert_eq!(record.status, Status::Running);
    assert_eq!(
        root.network().kill_process(&theirs).await?.status,
        Status::Stopped
    );

    // A node reached by name answers only with its own certificate: node-b's name at node-a's
    // address (what a forged gossip entry would say) is refused in the handshake.
    let impostor = root
        .network()
        .peer(&NodeName::from_static("node-b"), a.network().address());
    let refused = impostor.node().await.expect_err("node-a is not node-b");
    assert!(refused.to_string().contains("cannot reach"), "{refused}");
    let genuine = root
        .network()
        .peer(&NodeName::from_static("node-b"), b.network().address());
    assert_eq!(genuine.node().await?.name.as_str(), "node-b");
    Ok(())
}

/// The CA signs only what it can vouch for: no wildcard, no name under `.node.p2f`, no
/// address another node has; each refusal is a 422 and spends no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_no_foreign_names() -> anyhow::Result<()> {
    let root = root("root6").await?;
    let _pi = member(&root, "pi", "127.0.0.3").await?;
    root.hears("pi").await?;
    let token = JoinToken::decode(&root.join_token()?)?;
    let request = |hosts: &[&str]| JoinRequest {
        name: NodeName::from_static("laptop"),
        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        csr_pem: CertRequest::new("laptop")
            .expect("key")
            .csr_pem()
            .to_owned(),
        token: token.secret.clone(),
    };
    let cases: [(&[&str], &str); 4] = [
        (&["*.lan"], "wildcards"),
        (&["127.0.0.3"], "belongs to node pi"),
        (&["pi.node.p2f"], ".node.p2f"),
        (&["not a host"], "not a DNS name"),
    ];
    for (hosts, says) in cases {
        let err = root
            .network()
            .join(&request(hosts))
            .await
            .expect_err("refused");
        assert_eq!(err.status(), Some(422), "{hosts:?}: {err}");
        assert!(err.to_string().contains(says), "{hosts:?}: {err}");
    }
    // The same token, with the laptop's own address, is good.
    let signed = root.network().join(&request(&["127.0.0.9"])).await?;
    assert!(!signed.cert_pem.is_empty());
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
