//! Pure: the block of an `authorized_keys` file that P2F owns. It sits between a begin and an
//! end line naming the cluster; everything outside it is kept byte for byte. Each key line is
//! re-encoded from the parsed key (no options, the comment `p2f:NODE`), so nothing a node
//! publishes can add options such as `command=` or smuggle a second line in.

use std::collections::BTreeMap;

/// Why a file's block could not be edited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// A begin line without its end line: editing could eat lines that are not ours.
    #[error("the p2f block of cluster {label} has a begin line (line {line}) but no end line")]
    Unterminated {
        /// The cluster's label.
        label: String,
        /// The begin line's number (from 1).
        line: usize,
    },
}

/// The comment every key line of the block carries, before the node's name.
const NODE_COMMENT: &str = "p2f:";

/// The block's first line.
pub fn begin_line(label: &str) -> String {
    format!(
        "# BEGIN p2f cluster {label}: keys of its members, written by p2f (edits here are replaced)"
    )
}

/// The block's last line.
pub fn end_line(label: &str) -> String {
    format!("# END p2f cluster {label}")
}

/// A public key as one `authorized_keys` line for node `node` (no newline), or why not: the
/// key is parsed and written again, without options and with the comment `p2f:NODE`.
pub fn key_line(node: &str, public_key: &str) -> Result<String, String> {
    let mut key = ssh_key::PublicKey::from_openssh(public_key.trim())
        .map_err(|e| format!("not an OpenSSH public key: {e}"))?;
    key.set_comment(format!("{NODE_COMMENT}{node}"));
    key.to_openssh().map_err(|e| e.to_string())
}

/// The lines (with their terminators) of `text`.
fn lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

fn is(line: &str, wanted: &str) -> bool {
    line.trim_end_matches(['\n', '\r']) == wanted
}

/// Where the block is: the indices of its begin and end lines.
fn find(all: &[&str], label: &str) -> Result<Option<(usize, usize)>, BlockError> {
    let (begin, end) = (begin_line(label), end_line(label));
    let Some(start) = all.iter().position(|l| is(l, &begin)) else {
        return Ok(None);
    };
    match all[start..].iter().position(|l| is(l, &end)) {
        Some(offset) => Ok(Some((start, start + offset))),
        None => Err(BlockError::Unterminated {
            label: label.to_owned(),
            line: start + 1,
        }),
    }
}

/// The keys the block of `text` holds now, by node name (each line as written).
pub fn members(text: &str, label: &str) -> Result<BTreeMap<String, String>, BlockError> {
    let all = lines(text);
    let Some((begin, end)) = find(&all, label)? else {
        return Ok(BTreeMap::new());
    };
    Ok(all[begin + 1..end]
        .iter()
        .filter_map(|line| {
            let line = line.trim_end_matches(['\n', '\r']);
            let (_, name) = line.rsplit_once(&format!(" {NODE_COMMENT}"))?;
            Some((name.to_owned(), line.to_owned()))
        })
        .collect())
}

/// `text` with its block holding exactly `keys` (node name → key line from [`key_line`], in
/// name order): replaced where it was, appended at the end when there was none, removed when
/// `keys` is empty. Lines outside the block are unchanged (a last line without a newline gets
/// one when the block is appended after it).
pub fn apply(
    text: &str,
    label: &str,
    keys: &BTreeMap<String, String>,
) -> Result<String, BlockError> {
    let all = lines(text);
    let mut block = String::new();
    if !keys.is_empty() {
        block.push_str(&begin_line(label));
        block.push('\n');
        for line in keys.values() {
            block.push_str(line);
            block.push('\n');
        }
        block.push_str(&end_line(label));
        block.push('\n');
    }
    let mut out = String::with_capacity(text.len() + block.len());
    match find(&all, label)? {
        Some((begin, end)) => {
            all[..begin].iter().for_each(|l| out.push_str(l));
            out.push_str(&block);
            all[end + 1..].iter().for_each(|l| out.push_str(l));
        }
        None => {
            out.push_str(text);
            if !block.is_empty() && !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&block);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm0cXvJ1qKqZ3o7rjVQ9k3iW6n1Lr0c2m8l1o6s4YpB a@x\n";

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, k)| ((*n).to_owned(), key_line(n, k).expect("key")))
            .collect()
    }

    const OWN: &str = "# mine\nfrom=\"10.0.0.0/8\",no-pty ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm0cXvJ1qKqZ3o7rjVQ9k3iW6n1Lr0c2m8l1o6s4YpB me@home\n\n   # odd spacing \r\nlast line without newline";

    #[test]
    fn key_lines_are_re_encoded_with_the_node_as_comment() {
        let line = key_line("pi", KEY_A).expect("key");
        assert_eq!(
            line,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm0cXvJ1qKqZ3o7rjVQ9k3iW6n1Lr0c2m8l1o6s4YpB p2f:pi"
        );
        for bad in [
            "",
            "garbage",
            "command=\"rm -rf /\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm0cXvJ1qKqZ3o7rjVQ9k3iW6n1Lr0c2m8l1o6s4YpB",
            "ssh-ed25519 AAAA\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm0cXvJ1qKqZ3o7rjVQ9k3iW6n1Lr0c2m8l1o6s4YpB",
        ] {
            assert!(key_line("pi", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_block_is_added_replaced_and_removed_leaving_other_lines_alone() {
        let label = "home, CA 01020304";
        let added = apply(OWN, label, &keys(&[("pi", KEY_A)])).expect("apply");
        assert!(added.starts_with(OWN), "{added}");
        assert_eq!(&added[OWN.len()..OWN.len() + 1], "\n");
        assert!(added.ends_with(&format!("{}\n", end_line(label))));
        assert_eq!(
            members(&added, label)
                .expect("members")
                .keys()
                .collect::<Vec<_>>(),
            ["pi"]
        );

        // Lines after the block stay too, and the block is replaced where it is.
        let with_more = format!("{added}# after\n");
        let replaced =
            apply(&with_more, label, &keys(&[("pi", KEY_A), ("nas", KEY_A)])).expect("apply");
        assert!(replaced.starts_with(OWN) && replaced.ends_with("# after\n"));
        assert_eq!(
            members(&replaced, label)
                .expect("members")
                .keys()
                .collect::<Vec<_>>(),
            ["nas", "pi"]
        );
        let removed = apply(&replaced, label, &BTreeMap::new()).expect("remove");
        assert_eq!(removed, format!("{OWN}\n# after\n"));

        // Another cluster's block is not ours.
        let other = apply(&added, "work, CA 0a0b0c0d", &BTreeMap::new()).expect("other");
        assert_eq!(other, added);
        // Idempotent.
        let again = apply(&added, label, &keys(&[("pi", KEY_A)])).expect("again");
        assert_eq!(again, added);
        // From nothing.
        let fresh = apply("", label, &keys(&[("pi", KEY_A)])).expect("fresh");
        assert!(fresh.starts_with("# BEGIN p2f cluster home, CA 01020304"));
        assert_eq!(apply(&fresh, label, &BTreeMap::new()).expect("empty"), "");
    }

    #[test]
    fn a_block_without_its_end_is_left_alone() {
        let label = "home, CA 01020304";
        let text = format!("# a\n{}\nssh-ed25519 AAAA p2f:pi\n# b\n", begin_line(label));
        assert_eq!(
            apply(&text, label, &BTreeMap::new()),
            Err(BlockError::Unterminated {
                label: label.into(),
                line: 2
            })
        );
    }
}
