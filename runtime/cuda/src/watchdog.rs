//! The watchdog of a process's NCCL groups: a collective that does not complete within the
//! job's timeout is reported, naming the collective, its plan node, and the members that had
//! not arrived.
//!
//! NCCL queues a collective on the stream and returns at once; a peer that never arrives leaves
//! the collective's kernel waiting on the device and the rank blocked at its next wait for the
//! device, with nothing on the host bounding the wait. So every NCCL call of a watched group is
//! registered here, and an event recorded after it on the collective stream says when it ran:
//!
//! ```text
//! NcclGroup collective ─► Watch::begin (the group's `entered` = its sequence number)
//!   ─► the NCCL call ─► Watch::queued (the event after it)
//! the watchdog thread, every poll:
//!   completed events dropped; each group's `entered` published to the rendezvous store
//!   (`watch/<group>/<member>`) when it changed;
//!   a collective pending past the timeout ─► two polls later (the peers have published)
//!   ─► the members whose `entered` is below its sequence number had not arrived ─► Hang
//!   ─► the handler (the CLI: the error to the job's store and stderr, then the process exits)
//! ```
//!
//! Publishing from the watchdog thread rather than at each collective keeps the store off the
//! step's path: a few small writes per poll, the poll a twentieth of the timeout.

use cudarc::driver::{CudaContext, CudaEvent};
use ferrotron_exec::Rendezvous;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A collective that did not complete in time, and who had not arrived at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hang {
    /// The group's name (as the mesh names it: `tp/dp0/pp0`).
    pub group: String,
    /// The member that waited: its index in the group.
    pub member: usize,
    /// `all_reduce`, `all_gather` or `reduce_scatter`.
    pub op: &'static str,
    /// The plan node the collective belongs to (what the rank program last noted).
    pub node: String,
    /// The collective's sequence number in the group, from 1.
    pub seq: u64,
    /// How long it had waited when it was reported.
    pub waited: Duration,
    /// The members (indices in the group) that had not begun the collective.
    pub missing: Vec<usize>,
}

/// Watches the collectives of a process's NCCL groups from a thread of its own; stops the
/// thread when dropped.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    timeout: Duration,
    poll: Duration,
    store: Arc<dyn Rendezvous>,
    on_hang: Box<dyn Fn(Hang) + Send + Sync>,
    groups: Mutex<Vec<Arc<Watch>>>,
    pending: Mutex<Vec<Pending>>,
    stop: AtomicBool,
}

/// One member's registration of one group: what its collectives report to the watchdog.
pub struct Watch {
    group: String,
    member: usize,
    size: usize,
    /// The sequence number of the last collective begun.
    entered: AtomicU64,
    /// The last `entered` written to the store (`u64::MAX`: none yet).
    published: AtomicU64,
    node: Mutex<String>,
    shared: Arc<Shared>,
}

/// A collective begun and not yet seen complete.
struct Pending {
    watch: Arc<Watch>,
    seq: u64,
    op: &'static str,
    node: String,
    started: Instant,
    /// Recorded after the NCCL call on its stream; `None` while the call has not returned.
    event: Option<CudaEvent>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watchdog {
    /// A watchdog for collectives on `ctx`'s device: any that has not completed after `timeout`
    /// is resolved through `store` (shared by every rank of the job) and handed to `on_hang`,
    /// once; then the watchdog stops.
    pub fn new(
        ctx: Arc<CudaContext>,
        timeout: Duration,
        store: Arc<dyn Rendezvous>,
        on_hang: impl Fn(Hang) + Send + Sync + 'static,
    ) -> Watchdog {
        let poll = (timeout / 20).clamp(Duration::from_millis(20), Duration::from_secs(5));
        let shared = Arc::new(Shared {
            timeout,
            poll,
            store,
            on_hang: Box::new(on_hang),
            groups: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || {
                // Event queries and drops on this thread act on the device's context.
                let _ = ctx.bind_to_thread();
                watched.watch();
            })
            .ok();
        Watchdog { shared, thread }
    }

    /// Registers member `member` of the `size` members of group `group`.
    pub fn watch(&self, group: &str, member: usize, size: usize) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            group: group.to_owned(),
            member,
            size,
            entered: AtomicU64::new(0),
            published: AtomicU64::new(u64::MAX),
            node: Mutex::new(String::new()),
            shared: self.shared.clone(),
        });
        lock(&self.shared.groups).push(watch.clone());
        watch
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Watch {
    /// Notes the plan node whose collectives come next.
    pub fn note(&self, node: &str) {
        let mut n = lock(&self.node);
        n.clear();
        n.push_str(node);
    }

    /// A collective `op` begins: its sequence number, for [`Watch::queued`] or
    /// [`Watch::cancel`].
    pub fn begin(self: &Arc<Self>, op: &'static str) -> u64 {
        let seq = self.entered.fetch_add(1, Ordering::AcqRel) + 1;
        let node = lock(&self.node).clone();
        lock(&self.shared.pending).push(Pending {
            watch: self.clone(),
            seq,
            op,
            node,
            started: Instant::now(),
            event: None,
        });
        seq
    }

    /// Collective `seq`'s call returned; `event` completes when it has run on the device.
    pub fn queued(&self, seq: u64, event: CudaEvent) {
        // The newest entry is last.
        if let Some(p) = lock(&self.shared.pending)
            .iter_mut()
            .rev()
            .find(|p| p.seq == seq && std::ptr::eq(&*p.watch, self))
        {
            p.event = Some(event);
        }
    }

    /// Collective `seq` failed in its call (the error reaches the rank directly).
    pub fn cancel(&self, seq: u64) {
        lock(&self.shared.pending).retain(|p| !(p.seq == seq && std::ptr::eq(&*p.watch, self)));
    }

    fn key(&self, member: usize) -> String {
        format!("watch/{}/{member}", self.group)
    }

    /// Writes how far this member got, if that changed since the last write.
    fn publish(&self) {
        let entered = self.entered.load(Ordering::Acquire);
        if self.published.swap(entered, Ordering::AcqRel) != entered {
            // A store that cannot be reached leaves the peers' view older, nothing worse.
            let _ = self
                .shared
                .store
                .set(&self.key(self.member), entered.to_string().as_bytes());
        }
    }

    /// The members other than this one whose published progress is below `seq`.
    fn behind(&self, seq: u64) -> Vec<usize> {
        (0..self.size)
            .filter(|&m| m != self.member)
            .filter(|&m| {
                let reached = match self.shared.store.try_get(&self.key(m)) {
                    Ok(Some(v)) => std::str::from_utf8(&v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0),
                    _ => 0,
                };
                reached < seq
            })
            .collect()
    }
}

impl Shared {
    fn watch(&self) {
        while !self.stop.load(Ordering::Acquire) {
            std::thread::park_timeout(self.poll);
            // A collective whose event completed (or failed: the rank sees that error itself)
            // is done.
            let overdue = {
                let mut pending = lock(&self.pending);
                pending.retain(|p| match &p.event {
                    Some(e) => !e.try_is_complete().unwrap_or(true),
                    None => true,
                });
                pending
                    .iter()
                    .find(|p| p.started.elapsed() > self.timeout)
                    .map(|p| (p.watch.clone(), p.seq, p.op, p.node.clone(), p.started))
            };
            let groups: Vec<Arc<Watch>> = lock(&self.groups).clone();
            for g in &groups {
                g.publish();
            }
            if let Some((watch, seq, op, node, started)) = overdue {
                // The peers publish on their next poll; two polls later every live one has.
                std::thread::park_timeout(2 * self.poll);
                let missing = watch.behind(seq);
                (self.on_hang)(Hang {
                    group: watch.group.clone(),
                    member: watch.member,
                    op,
                    node,
                    seq,
                    waited: started.elapsed(),
                    missing,
                });
                return;
            }
        }
    }
}
