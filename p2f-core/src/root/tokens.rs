//! The root's join tokens: each kept as the SHA-256 of its secret with its end of validity and
//! the joins it has left, in `DATA/join-tokens.json` (0600, written whole through a rename),
//! as kubeadm keeps bootstrap tokens. A token is spent by a join that succeeds; an expired or
//! spent one is forgotten at the next write.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use crate::join::JoinToken;

/// The longest a token may be valid.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
/// The most joins one token may allow.
pub const MAX_USES: u32 = 1000;
/// The most tokens kept at once (expired and spent ones are dropped first).
const MAX_TOKENS: usize = 1000;

/// Why a token was refused or could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenBookError {
    /// No token has this secret (never made, or mistyped).
    #[error("unknown join token: make one on the root with `p2f node token`")]
    Unknown,
    /// Its time is up.
    #[error("this join token expired {ago} ago: make a new one with `p2f node token`")]
    Expired {
        /// How long ago, for people ("3m").
        ago: String,
    },
    /// Every join it allowed has happened.
    #[error(
        "this join token was already used: make a new one with `p2f node token` (`--uses N` for several nodes)"
    )]
    Spent,
    /// A request outside the bounds.
    #[error("{0}")]
    Invalid(String),
    /// The book could not be saved.
    #[error("cannot save the join tokens: {0}")]
    Save(#[from] crate::fsutil::WriteError),
}

/// One kept token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// SHA-256 of the secret, hex.
    hash: String,
    /// Seconds since the Unix epoch.
    expires_at: u64,
    /// Joins it still allows.
    uses_left: u32,
}

/// The root's join tokens (see the module's documentation).
#[derive(Debug)]
pub struct TokenBook {
    path: PathBuf,
    entries: Mutex<Vec<Entry>>,
}

/// The wall clock in seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    p2f_model::Timestamp::now().0 / 1000
}

impl TokenBook {
    /// The book in `path`; a missing or unreadable file is an empty book (a warning says so
    /// for an unreadable one: its tokens stop working, nothing else is lost).
    pub fn open(path: PathBuf) -> TokenBook {
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "unreadable join tokens, starting without them: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        TokenBook {
            path,
            entries: Mutex::new(entries),
        }
    }

    /// Keeps a new token valid for `ttl` and `uses` joins; returns its secret's entry time.
    ///
    /// Errors: [`TokenBookError::Invalid`] for a `ttl` of zero or over [`MAX_TTL`], `uses` of
    /// zero or over [`MAX_USES`], or too many tokens kept; [`TokenBookError::Save`].
    pub fn add(&self, token: &JoinToken, ttl: Duration, uses: u32) -> Result<u64, TokenBookError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenBookError::Invalid(format!(
                "a join token lives between 1 s and {} days",
                MAX_TTL.as_secs() / 86_400
            )));
        }
        if uses == 0 || uses > MAX_USES {
            return Err(TokenBookError::Invalid(format!(
                "a join token allows between 1 and {MAX_USES} joins"
            )));
        }
        let now = now_secs();
        let mut entries = self.lock();
        let mut next = live(&entries, now);
        if next.len() >= MAX_TOKENS {
            return Err(TokenBookError::Invalid(format!(
                "{MAX_TOKENS} join tokens are valid already: let some expire first"
            )));
        }
        let expires_at = now.saturating_add(ttl.as_secs());
        next.push(Entry {
            hash: JoinToken::hash_secret(&token.secret),
            expires_at,
            uses_left: uses,
        });
        self.save(&next)?;
        *entries = next;
        Ok(expires_at)
    }

    /// Checks `secret`, runs `join` while no other join can spend the same token, and spends
    /// one use of it when `join` succeeds.
    ///
    /// Errors: the token's refusal ([`TokenBookError::Unknown`], `Expired`, `Spent`) as
    /// `Err(Ok(..))`; `join`'s own error as `Err(Err(..))`.
    pub fn redeem<T, E>(
        &self,
        secret: &str,
        join: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, Result<TokenBookError, E>> {
        let hash = JoinToken::hash_secret(secret);
        let now = now_secs();
        let mut entries = self.lock();
        let found = entries
            .iter()
            .position(|e| bool::from(e.hash.as_bytes().ct_eq(hash.as_bytes())));
        let Some(index) = found else {
            return Err(Ok(TokenBookError::Unknown));
        };
        let entry = &entries[index];
        if entry.expires_at <= now {
            let ago = Duration::from_secs(now - entry.expires_at);
            return Err(Ok(TokenBookError::Expired {
                ago: p2f_model::format_duration(ago),
            }));
        }
        if entry.uses_left == 0 {
            return Err(Ok(TokenBookError::Spent));
        }
        let value = join().map_err(Err)?;
        let mut next = entries.clone();
        next[index].uses_left -= 1;
        if let Err(e) = self.save(&live(&next, now)) {
            // The member has its certificate; the token is spent in memory at least.
            tracing::warn!("{e}");
        }
        // Spent ones stay in memory until the next write, so a second try says "used".
        *entries = next;
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, entries: &[Entry]) -> Result<(), crate::fsutil::WriteError> {
        let json = serde_json::to_vec_pretty(entries).unwrap_or_default();
        crate::fsutil::write_private(&self.path, json)
    }
}

/// The entries still good at `now`.
fn live(entries: &[Entry], now: u64) -> Vec<Entry> {
    entries
        .iter()
        .filter(|e| e.expires_at > now && e.uses_left > 0)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken::generate("127.0.0.1:7440".into(), None, String::new())
    }

    #[test]
    fn a_token_is_single_use_unless_asked_and_kept_hashed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("join-tokens.json");
        let book = TokenBook::open(path.clone());
        let once = token();
        let twice = token();
        book.add(&once, Duration::from_secs(3600), 1).expect("add");
        book.add(&twice, Duration::from_secs(3600), 2).expect("add");
        let file = std::fs::read_to_string(&path).expect("file");
        assert!(
            !file.contains(&once.secret),
            "the secret itself is never kept"
        );
        assert!(file.contains(&JoinToken::hash_secret(&once.secret)));

        let ok = || Ok::<_, ()>(());
        assert!(book.redeem(&once.secret, ok).is_ok());
        assert!(matches!(
            book.redeem(&once.secret, ok),
            Err(Ok(TokenBookError::Spent))
        ));
        // A failed join spends nothing.
        assert!(matches!(
            book.redeem(&twice.secret, || Err::<(), _>("no")),
            Err(Err("no"))
        ));
        assert!(book.redeem(&twice.secret, ok).is_ok());
        assert!(book.redeem(&twice.secret, ok).is_ok());
        assert!(matches!(
            book.redeem(&twice.secret, ok),
            Err(Ok(TokenBookError::Spent))
        ));
        assert!(matches!(
            book.redeem(&token().secret, ok),
            Err(Ok(TokenBookError::Unknown))
        ));

        // What was saved survives a restart of the root.
        let third = token();
        book.add(&third, Duration::from_secs(3600), 1).expect("add");
        let reopened = TokenBook::open(path);
        assert!(reopened.redeem(&third.secret, ok).is_ok());
        assert!(matches!(
            reopened.redeem(&once.secret, ok),
            Err(Ok(TokenBookError::Unknown))
        ));
    }

    #[test]
    fn an_expired_token_is_refused_and_bounds_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let book = TokenBook::open(dir.path().join("t.json"));
        let old = token();
        book.add(&old, Duration::from_secs(1), 1).expect("add");
        book.lock()[0].expires_at = now_secs() - 90;
        let err = book
            .redeem(&old.secret, || Ok::<_, ()>(()))
            .expect_err("refused");
        assert!(matches!(err, Ok(TokenBookError::Expired { .. })), "{err:?}");
        for (ttl, uses) in [
            (0, 1),
            (MAX_TTL.as_secs() + 1, 1),
            (60, 0),
            (60, MAX_USES + 1),
        ] {
            assert!(matches!(
                book.add(&token(), Duration::from_secs(ttl), uses),
                Err(TokenBookError::Invalid(_))
            ));
        }
    }
}
