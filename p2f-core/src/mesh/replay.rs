//! Which counters each sender already used: a receiver accepts each (sender, counter) of an
//! authentic datagram once.
//!
//! Senders are named by the sender id in the authenticated header (`auth.rs`), not by source
//! address: a replayed datagram sent from a spoofed address is checked against the real
//! sender's state, and nothing that lacks the cluster key can create or change an entry.
//!
//! Per sender, the highest counter accepted and which of the [`REORDER`] counters below it were
//! accepted too (IPsec's and WireGuard's sliding window): a datagram overtaken by a later one
//! from the same sender is still accepted once, one older than the window is dropped.

use std::collections::HashMap;
use std::time::Instant;

/// Most senders remembered at once; the least recently accepted is forgotten first. A sender
/// is one transport instance (a node restarted is a new sender), so this is many times a
/// cluster's size. Forgetting a sender matters only for its datagrams still inside the clock
/// window (`auth::MAX_SKEW`), which could then be accepted once more.
pub(super) const MAX_SENDERS: usize = 1024;
/// How far behind a sender's highest counter a late datagram is still accepted (once).
pub(super) const REORDER: u64 = 64;

/// One sender's accepted counters.
#[derive(Debug)]
struct Window {
    /// The highest counter accepted.
    highest: u64,
    /// Bit `i` set: counter `highest - i` was accepted (bit 0 is `highest` itself).
    seen: u64,
    /// When a datagram of this sender was last accepted, for eviction.
    last_accepted: Instant,
}

impl Window {
    fn new(counter: u64, now: Instant) -> Window {
        Window {
            highest: counter,
            seen: 1,
            last_accepted: now,
        }
    }

    /// Records `counter` and says whether it is new.
    fn accept(&mut self, counter: u64, now: Instant) -> bool {
        if counter > self.highest {
            let ahead = counter - self.highest;
            self.seen = if ahead >= REORDER {
                0
            } else {
                self.seen << ahead
            };
            self.seen |= 1;
            self.highest = counter;
        } else {
            let behind = self.highest - counter;
            if behind >= REORDER || self.seen & (1 << behind) != 0 {
                return false;
            }
            self.seen |= 1 << behind;
        }
        self.last_accepted = now;
        true
    }
}

/// The windows of the senders heard lately, at most [`MAX_SENDERS`].
#[derive(Debug, Default)]
pub(super) struct Senders {
    by_id: HashMap<u64, Window>,
}

impl Senders {
    /// Records that `sender` used `counter` and says whether it had not before (a replay
    /// otherwise). Call it only for authentic datagrams, after the clock check.
    pub(super) fn accept(&mut self, sender: u64, counter: u64, now: Instant) -> bool {
        if let Some(window) = self.by_id.get_mut(&sender) {
            return window.accept(counter, now);
        }
        if self.by_id.len() >= MAX_SENDERS {
            let oldest = self
                .by_id
                .iter()
                .min_by_key(|(_, window)| window.last_accepted)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                self.by_id.remove(&id);
            }
        }
        self.by_id.insert(sender, Window::new(counter, now));
        true
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_is_accepted_once_late_ones_within_the_window() {
        let now = Instant::now();
        let mut senders = Senders::default();
        assert!(senders.accept(7, 1_000, now));
        assert!(!senders.accept(7, 1_000, now), "a duplicate");
        assert!(senders.accept(7, 1_003, now));
        assert!(senders.accept(7, 1_001, now), "late but within the window");
        assert!(!senders.accept(7, 1_001, now), "late and already seen");
        assert!(senders.accept(7, 1_002, now));
        assert!(!senders.accept(7, 1_003, now));
        // Far ahead: everything before the new window is refused, even if never seen.
        assert!(senders.accept(7, 1_003 + REORDER, now));
        assert!(!senders.accept(7, 1_003, now), "too old");
        assert!(
            senders.accept(7, 1_004, now),
            "the oldest counter still inside"
        );
        assert!(senders.accept(7, 1_003 + 10 * REORDER, now));
        assert!(!senders.accept(7, 1_003 + 9 * REORDER, now));
        // Another sender has its own window: counters sender 7 used are new from sender 8.
        assert!(senders.accept(8, 1_000, now));
        assert!(senders.accept(8, 1_001, now));
        assert!(!senders.accept(8, 1_001, now));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_least_recently_accepted() {
        let start = Instant::now();
        let mut senders = Senders::default();
        for id in 0..MAX_SENDERS as u64 {
            let at = start + std::time::Duration::from_millis(id);
            assert!(senders.accept(id, 100, at));
        }
        // Sender 0 is heard again: sender 1 is now the least recently accepted.
        let later = start + std::time::Duration::from_secs(10);
        assert!(senders.accept(0, 101, later));
        assert!(senders.accept(u64::MAX, 100, later));
        assert_eq!(senders.len(), MAX_SENDERS);
        assert!(!senders.accept(0, 101, later), "sender 0 was kept");
        assert!(senders.accept(1, 100, later), "sender 1 was forgotten");
    }
}
