//! How long to wait before trying a peer again after a transient failure
//! (a forward destination, a storage commitment requester): exponential,
//! from [`FIRST`] doubling to [`CAP`], with jitter so that devices that lost
//! the same PACS do not all come back in the same second.

use std::time::Duration;

/// The first pause.
pub const FIRST: Duration = Duration::from_secs(2);
/// The longest pause: a PACS that comes back is found within this.
pub const CAP: Duration = Duration::from_secs(300);

/// The pauses of one destination.
#[derive(Debug, Default, Clone)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A failure: the pause to wait before the next attempt (the nominal
    /// pause, less up to a quarter at random).
    pub fn failed(&mut self) -> Duration {
        let nominal = FIRST.saturating_mul(1u32 << self.failures.min(16)).min(CAP);
        self.failures = self.failures.saturating_add(1);
        let jitter = nominal.mul_f64(fastrand::f64() * 0.25);
        nominal - jitter
    }

    /// A success: the next failure starts from [`FIRST`] again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Whether the last attempt failed.
    pub fn is_failing(&self) -> bool {
        self.failures > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_with_jitter_and_reset_on_success() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..12).map(|_| b.failed()).collect();
        for (n, pause) in pauses.iter().enumerate() {
            let nominal = FIRST.saturating_mul(1 << n).min(CAP);
            assert!(*pause <= nominal, "pause {n}: {pause:?} over {nominal:?}");
            assert!(*pause >= nominal.mul_f64(0.75), "pause {n}: {pause:?}");
        }
        assert!(pauses[11] >= CAP.mul_f64(0.75));
        assert!(b.is_failing());
        b.succeeded();
        assert!(!b.is_failing());
        assert!(b.failed() <= FIRST);
    }
}
