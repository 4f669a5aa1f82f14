//! Association slots: the cap on concurrent associations, a cap per peer
//! address, and eviction of the association idle longest, so that silent
//! associations cannot hold the receiver hostage.
//!
//! A slot is taken when an A-ASSOCIATE-RQ arrives, before negotiation.
//! When every slot is taken, the association that has read nothing for the
//! longest time, if that is at least `evict_idle_after`, is asked to stop
//! (its stop fires between messages, as a shutdown does) and the new one is
//! admitted at once: a real sender gets in however many peers associate
//! and then say nothing. An association asked to stop keeps its slot until
//! it ends, but is never chosen twice, so at most `2 x max_associations`
//! associations exist at any moment (memory stays bounded). A peer stuck
//! in the middle of a message stops at its DIMSE timeout instead.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Milliseconds since the first use of the slots, for activity stamps that
/// fit an atomic.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When an association last read or wrote something: one atomic store per
/// read or write.
#[derive(Debug)]
pub struct Activity(AtomicU64);

impl Activity {
    fn new() -> Self {
        Activity(AtomicU64::new(now_ms()))
    }

    /// Records that bytes arrived or left now.
    pub fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// How long nothing has arrived or left.
    pub fn idle(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// The bounds slots are taken under (part of the live limits).
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    /// concurrent associations
    pub max_associations: usize,
    /// concurrent associations from one address (0: no cap of its own)
    pub max_per_peer: usize,
    /// an association idle this long may be stopped to admit a new one
    /// (zero: never)
    pub evict_idle_after: Duration,
}

/// Why no slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every slot is taken and none has been idle long enough.
    Full,
    /// This address has its share already.
    PeerFull,
}

/// The association that was asked to stop so that another could start.
#[derive(Debug, Clone, Copy)]
pub struct Evicted {
    /// its peer
    pub peer: IpAddr,
    /// how long it had read nothing
    pub idle: Duration,
}

struct Entry {
    id: u64,
    peer: IpAddr,
    activity: Arc<Activity>,
    stop: CancellationToken,
    /// asked to stop; no longer counted or chosen
    evicted: bool,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    entries: Vec<Entry>,
}

/// The slots of one receiver (all its ports).
#[derive(Clone, Default)]
pub struct Slots {
    table: Arc<Mutex<Table>>,
}

/// A taken slot: given back when dropped.
pub struct Slot {
    table: Arc<Mutex<Table>>,
    id: u64,
    /// stamped on every read (see [`Tracked`])
    pub activity: Arc<Activity>,
    /// cancelled when the association is to stop: the receiver's shutdown,
    /// or an eviction
    pub stop: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table).entries.retain(|e| e.id != self.id);
    }
}

/// Every operation is one edit of the table, so a panic cannot leave it
/// inconsistent: a poisoned lock is taken over.
fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Slots {
    /// Takes a slot for an association from `peer`, evicting the
    /// association idle longest if every slot is taken. `shutdown` is the
    /// receiver's: the slot's stop is its child.
    pub fn take(
        &self,
        peer: IpAddr,
        limits: SlotLimits,
        shutdown: &CancellationToken,
    ) -> Result<(Slot, Option<Evicted>), NoSlot> {
        let mut table = lock(&self.table);
        let live = || table.entries.iter().filter(|e| !e.evicted);
        if limits.max_per_peer > 0
            && live().filter(|e| e.peer == peer).count() >= limits.max_per_peer
        {
            return Err(NoSlot::PeerFull);
        }
        let mut evicted = None;
        if live().count() >= limits.max_associations {
            let victim = table
                .entries
                .iter_mut()
                .filter(|e| !e.evicted)
                .map(|e| (e.activity.idle(), e))
                .filter(|(idle, _)| {
                    !limits.evict_idle_after.is_zero() && *idle >= limits.evict_idle_after
                })
                .max_by_key(|(idle, _)| *idle);
            let Some((idle, victim)) = victim else {
                return Err(NoSlot::Full);
            };
            victim.evicted = true;
            victim.stop.cancel();
            evicted = Some(Evicted {
                peer: victim.peer,
                idle,
            });
        }
        let id = table.next_id;
        table.next_id += 1;
        let activity = Arc::new(Activity::new());
        let stop = shutdown.child_token();
        table.entries.push(Entry {
            id,
            peer,
            activity: Arc::clone(&activity),
            stop: stop.clone(),
            evicted: false,
        });
        drop(table);
        Ok((
            Slot {
                table: Arc::clone(&self.table),
                id,
                activity,
                stop,
            },
            evicted,
        ))
    }

    /// Associations counted against the cap now.
    pub fn active(&self) -> usize {
        lock(&self.table)
            .entries
            .iter()
            .filter(|e| !e.evicted)
            .count()
    }
}

/// A stream that stamps its slot's [`Activity`] whenever bytes arrive or
/// leave. Leaving counts too: during a C-MOVE nothing arrives from the
/// requester, while a pending response goes to it after each object. A
/// silent peer cannot fake it: once it stops reading, our writes stall and
/// stamp nothing.
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`, stamping `activity`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_peer: usize, evict_ms: u64) -> SlotLimits {
        SlotLimits {
            max_associations: max,
            max_per_peer: per_peer,
            evict_idle_after: Duration::from_millis(evict_ms),
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn the_cap_holds_without_eviction() {
        let slots = Slots::default();
        let root = CancellationToken::new();
        let (_a, _) = slots.take(A, limits(1, 0, 0), &root).expect("first");
        assert_eq!(
            slots.take(B, limits(1, 0, 0), &root).err(),
            Some(NoSlot::Full)
        );
    }

    #[test]
    fn the_idle_longest_is_evicted_once() {
        let slots = Slots::default();
        let root = CancellationToken::new();
        let l = limits(2, 0, 20);
        let (old, _) = slots.take(A, l, &root).expect("first");
        std::thread::sleep(Duration::from_millis(30));
        let (fresh, _) = slots.take(B, l, &root).expect("second");
        // Too fresh to evict: only `old` is idle long enough.
        let (_c, evicted) = slots.take(B, l, &root).expect("third, by eviction");
        let evicted = evicted.expect("someone made room");
        assert_eq!(evicted.peer, A);
        assert!(old.stop.is_cancelled());
        assert!(!fresh.stop.is_cancelled());
        // `old` is not chosen again, and `fresh` has not idled enough.
        assert_eq!(slots.take(A, l, &root).err(), Some(NoSlot::Full));
        drop(old);
        assert_eq!(slots.active(), 2);
        // Activity keeps an association from being chosen.
        std::thread::sleep(Duration::from_millis(30));
        fresh.activity.touch();
        assert!(slots.take(A, l, &root).is_ok(), "the third one is idle");
    }

    #[test]
    fn a_peer_gets_its_share_only() {
        let slots = Slots::default();
        let root = CancellationToken::new();
        let l = limits(10, 2, 0);
        let (_a1, _) = slots.take(A, l, &root).expect("1");
        let (_a2, _) = slots.take(A, l, &root).expect("2");
        assert_eq!(slots.take(A, l, &root).err(), Some(NoSlot::PeerFull));
        assert!(slots.take(B, l, &root).is_ok());
    }

    #[test]
    fn shutdown_reaches_every_slot() {
        let slots = Slots::default();
        let root = CancellationToken::new();
        let (a, _) = slots.take(A, limits(4, 0, 0), &root).expect("a");
        root.cancel();
        assert!(a.stop.is_cancelled());
    }

    #[tokio::test]
    async fn reads_and_writes_both_stamp_activity() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let activity = Arc::new(Activity(AtomicU64::new(0)));
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut tracked = Tracked::new(ours, Arc::clone(&activity));
        now_ms();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let long_ago = activity.idle();
        assert!(long_ago >= Duration::from_millis(30));
        tracked.write_all(b"pending").await.expect("writes");
        assert!(activity.idle() < long_ago, "a write is activity");
        activity.0.store(0, Ordering::Relaxed);
        theirs.write_all(b"x").await.expect("peer writes");
        let mut byte = [0u8; 1];
        tracked.read_exact(&mut byte).await.expect("reads");
        assert!(activity.idle() < long_ago, "a read is activity");
    }
}
