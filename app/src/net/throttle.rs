//! Connection events from one peer, summarised beyond a rate.
//!
//! A peer that reconnects in a loop (a misconfigured modality, a scanner,
//! a flood) would otherwise write a log line and an audit record per
//! connection and push the real history out of the bounded logs. Each
//! address may have [`BURST`] events recorded per [`WINDOW`]; past that
//! they are counted, and one line per peer and window says how many were
//! not recorded. The table is bounded: past [`MAX_PEERS`] addresses the
//! stalest is summarised and forgotten.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

/// Events recorded per peer and window.
pub const BURST: u32 = 5;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Addresses tracked at once.
pub const MAX_PEERS: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    recorded: u32,
    suppressed: u64,
}

/// Decides, per peer, whether a connection event is recorded.
#[derive(Default)]
pub struct Throttle {
    peers: Mutex<HashMap<IpAddr, Window>>,
}

impl Throttle {
    /// True when this event from `peer` should be logged and audited; false
    /// when it is only counted (and summarised later).
    pub fn allow(&self, peer: IpAddr) -> bool {
        self.allow_at(peer, Instant::now())
    }

    fn allow_at(&self, peer: IpAddr, now: Instant) -> bool {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if !peers.contains_key(&peer) && peers.len() >= MAX_PEERS {
            Self::forget_stalest(&mut peers);
        }
        let window = peers.entry(peer).or_insert(Window {
            started: now,
            recorded: 0,
            suppressed: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            summarise(peer, window);
            *window = Window {
                started: now,
                recorded: 0,
                suppressed: 0,
            };
        }
        if window.recorded < BURST {
            window.recorded += 1;
            true
        } else {
            window.suppressed += 1;
            false
        }
    }

    /// Summarises every window that has ended (call now and then, so that
    /// a flood that stopped is still reported) and forgets quiet peers.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.retain(|peer, window| {
            let ended = now.duration_since(window.started) >= WINDOW;
            if ended {
                summarise(*peer, window);
            }
            !ended
        });
    }

    fn forget_stalest(peers: &mut HashMap<IpAddr, Window>) {
        if let Some((&peer, window)) = peers.iter().min_by_key(|(_, w)| w.started) {
            summarise(peer, window);
            peers.remove(&peer);
        }
    }

    /// Events from `peer` counted but not recorded in its current window.
    #[cfg(test)]
    fn suppressed(&self, peer: IpAddr) -> u64 {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.get(&peer).map_or(0, |w| w.suppressed)
    }
}

fn summarise(peer: IpAddr, window: &Window) {
    if window.suppressed > 0 {
        warn!(
            %peer,
            not_logged = window.suppressed,
            window_secs = WINDOW.as_secs(),
            "more connection events from this peer than the log takes; counted, not logged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_burst_then_counts_then_a_new_window() {
        let t = Throttle::default();
        let start = Instant::now();
        let allowed = (0..100).filter(|_| t.allow_at(A, start)).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(t.suppressed(A), 100 - u64::from(BURST));
        assert!(t.allow_at(B, start), "another peer has its own budget");
        assert!(t.allow_at(A, start + WINDOW), "a new window");
        assert_eq!(t.suppressed(A), 0);
    }

    #[test]
    fn the_table_is_bounded() {
        let t = Throttle::default();
        let now = Instant::now();
        for i in 0..(MAX_PEERS as u32 + 10) {
            t.allow_at(IpAddr::from(i.to_be_bytes()), now);
        }
        let peers = t.peers.lock().expect("lock");
        assert!(peers.len() <= MAX_PEERS);
    }
}
