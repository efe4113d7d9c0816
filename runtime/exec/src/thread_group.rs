//! In-process collectives: the host group of ranks that are threads of one process (the CPU
//! backend's communicator under the in-process launcher; the CUDA backend's virtual ranks reduce
//! their host statistics with it too).
//!
//! The launcher gives each tensor-parallel group and each data-parallel group one
//! [`ThreadGroup`], shared (through an [`Arc`]) by the member threads; each member passes its rank
//! in the group to every call. The collectives are the plan's:
//!
//! * [`ThreadGroup::all_reduce`] with [`ReduceOp::Sum`]: Megatron's g (and f's backward), and the
//!   gradient all-reduce over the data-parallel group; with [`ReduceOp::Max`]: the max over the
//!   vocabulary shards in the vocabulary-parallel cross-entropy;
//! * [`ThreadGroup::all_gather`] and [`ThreadGroup::reduce_scatter`]: sequence parallelism.
//!
//! # Protocol
//!
//! Members never copy their data into shared staging buffers: each publishes the address of its
//! own buffer, and peers read it in place. A collective is a few steps separated by a
//! generation-counted barrier (a [`Mutex`] and a [`Condvar`]):
//!
//! ```text
//! all_reduce      publish ─barrier─ reduce own chunk ─barrier─ copy peers' chunks ─barrier─ return
//! reduce_scatter  publish ─barrier─ reduce own chunk into `out`               ─barrier─ return
//! all_gather      publish ─barrier─ copy peers' slices into `out`             ─barrier─ return
//! ```
//!
//! For an all-reduce of `n` elements, member `r` owns chunk `r` (the `n` elements split into
//! `size` nearly equal contiguous chunks); it sums that chunk over all members' buffers, in rank
//! order, into its own buffer, then copies every other chunk from its owner. Each member thus
//! reads about `2n` and writes `n` elements, whatever the group size (a naive all-reduce would
//! read `size × n`), and since the order of every sum is fixed (rank 0 + rank 1 + …) and every
//! member receives the same owner's result, results are bit-identical across members and runs.
//! A group of one returns at once.
//!
//! # Failure
//!
//! Nothing hangs: every wait is bounded by the group's timeout ([`CommError::Timeout`]), members
//! whose collectives disagree (kind, reduction or length) get [`CommError::Mismatch`], and
//! [`ThreadGroup::abort`] wakes every waiting member with [`CommError::PeerFailed`]. Any of
//! these fails the group for good: every later call returns the same error. A failing member still waits,
//! before returning, until no peer is reading its buffer (peers only read between barriers, which
//! is a bounded amount of computation, never a wait), so its caller may free it.

use crate::comm::{chunk, reduce_scatter_problem, Call, CommError, HostCollectives, ReduceOp};
use std::ops::Range;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where a barrier sits in a collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The first: checks the call and publishes the buffer; peers read it after.
    Publish,
    /// Between two reading phases.
    Middle,
    /// The last: nobody reads after it.
    Finish,
}

/// The barrier's state, under the group's mutex.
struct State {
    /// Counts completed barriers.
    generation: u64,
    /// Members arrived at the current barrier.
    arrived: usize,
    /// `marks[r] == generation + 1` when rank `r` has arrived at the current barrier.
    marks: Vec<u64>,
    /// The current collective and the rank that set it (the first to arrive).
    call: Option<(Call, usize)>,
    /// The barrier the group is at: members arriving at another are rejected (two threads using
    /// one rank would otherwise be able to swap a buffer under its readers).
    step: Step,
    /// Members released from a barrier into a phase that reads peers' buffers and not yet arrived
    /// at the next one. No member returns while this is non-zero.
    reading: usize,
    /// Set once, never cleared.
    failure: Option<CommError>,
}

/// A communicator group of `size` members (threads), each identified by its rank `0..size`.
pub struct ThreadGroup {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
    /// Each member's published buffer, valid from its `Publish` barrier to its `Finish` barrier.
    /// Written under `state`'s lock; read after a barrier release, which the lock orders after.
    bufs: Box<[AtomicPtr<f32>]>,
}

impl std::fmt::Debug for ThreadGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadGroup")
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Elements reduced at a time: a stack block that stays in L1.
const BLOCK: usize = 1024;

impl ThreadGroup {
    /// A group of `size` members; `timeout` bounds every wait.
    ///
    /// # Panics
    ///
    /// If `size` is 0.
    pub fn new(size: usize, timeout: Duration) -> Arc<ThreadGroup> {
        assert!(size > 0, "a communicator group needs at least one member");
        Arc::new(ThreadGroup {
            size,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                marks: vec![0; size],
                call: None,
                step: Step::Publish,
                reading: 0,
                failure: None,
            }),
            wake: Condvar::new(),
            bufs: (0..size)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
        })
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Reduces every member's `buf` elementwise (all the same length) into every member's `buf`,
    /// in place.
    pub fn all_reduce(&self, rank: usize, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let call = Call {
            op: "all_reduce",
            reduce: Some(op),
            len: buf.len(),
        };
        self.check_local(rank, call, None)?;
        if self.size == 1 {
            return Ok(());
        }
        let n = buf.len();
        // From here on `buf` is only accessed through `mine`, which peers read too.
        let mine = buf.as_mut_ptr();
        self.barrier(rank, call, Step::Publish, mine)?;
        let own = chunk(n, self.size, rank);
        // SAFETY: after the `Publish` barrier every member's published pointer addresses `n`
        // elements (checked equal), alive and not moved until that member passes `Finish`, which
        // it cannot before we arrive there (and no failing member returns while we read). In this
        // phase every member reads chunk `owner` of every buffer and writes only chunk `owner`
        // of its own: the regions written (chunk r of buffer r) are read by nobody else.
        unsafe { self.reduce_chunk(own.clone(), op, mine.add(own.start)) };
        self.barrier(rank, call, Step::Middle, mine)?;
        for owner in (0..self.size).filter(|&o| o != rank) {
            let c = chunk(n, self.size, owner);
            let src = self.bufs[owner].load(Ordering::Relaxed);
            // SAFETY: as above, buffers stay alive until `Finish`; the `Middle` barrier orders
            // the owner's write of its chunk before this read. In this phase member `m` reads
            // chunk `o` of buffer `o` (never written now) and writes chunks `o != m` of buffer
            // `m` (never read now): no region is both read and written, and ours is disjoint
            // from the peer's, so the two slices do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(c.start), mine.add(c.start), c.len());
            }
        }
        self.barrier(rank, call, Step::Finish, mine)
    }

    /// Concatenates the members' `local` slices (equal lengths) in rank order into `out`
    /// (`size × local.len()`).
    pub fn all_gather(&self, rank: usize, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let call = Call {
            op: "all_gather",
            reduce: None,
            len: local.len(),
        };
        let want = local.len() * self.size;
        self.check_local(
            rank,
            call,
            (out.len() != want).then(|| format!("output has {} elements, not {want}", out.len())),
        )?;
        let l = local.len();
        if self.size == 1 {
            out.copy_from_slice(local);
            return Ok(());
        }
        self.barrier(rank, call, Step::Publish, local.as_ptr().cast_mut())?;
        for (m, dst) in out.chunks_exact_mut(l.max(1)).enumerate().take(self.size) {
            if m == rank {
                dst.copy_from_slice(local);
            } else {
                let src = self.bufs[m].load(Ordering::Relaxed);
                // SAFETY: member `m` published its `local`, `l` elements (checked equal), which
                // stays borrowed, unmodified, until it passes `Finish` (after we arrive there).
                // Shared borrows are only read; `out` is our own exclusive borrow, so it cannot
                // overlap any peer's live `local`.
                dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src, l) });
            }
        }
        self.barrier(rank, call, Step::Finish, std::ptr::null_mut())
    }

    /// Sums the members' `input` (equal lengths, a multiple of size) and writes chunk `rank`
    /// (length input.len()/size) into `out`.
    pub fn reduce_scatter(
        &self,
        rank: usize,
        input: &[f32],
        out: &mut [f32],
    ) -> Result<(), CommError> {
        let call = Call {
            op: "reduce_scatter",
            reduce: Some(ReduceOp::Sum),
            len: input.len(),
        };
        let problem = reduce_scatter_problem(input.len(), out.len(), self.size);
        self.check_local(rank, call, problem)?;
        if self.size == 1 {
            out.copy_from_slice(input);
            return Ok(());
        }
        self.barrier(rank, call, Step::Publish, input.as_ptr().cast_mut())?;
        let own = chunk(input.len(), self.size, rank);
        // SAFETY: every member published its `input` (same length, checked), shared-borrowed and
        // unmodified until it passes `Finish`; we only read them. `out` is our own exclusive
        // borrow, disjoint from every live peer borrow, and written through its own pointer.
        unsafe { self.reduce_chunk(own, ReduceOp::Sum, out.as_mut_ptr()) };
        self.barrier(rank, call, Step::Finish, std::ptr::null_mut())
    }

    /// Fails the group: every member waiting in, or later entering, a collective returns
    /// PeerFailed { rank, why } promptly (well under a second), and so does this one afterwards.
    pub fn abort(&self, rank: usize, why: &str) {
        self.fail(
            &mut self.lock(),
            CommError::PeerFailed {
                rank,
                why: why.to_string(),
            },
        );
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics under the lock, but a poisoned lock must not hide the group's state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the group's first failure and wakes every waiter; returns the recorded failure.
    fn fail(&self, st: &mut State, err: CommError) -> CommError {
        let err = st.failure.get_or_insert(err).clone();
        self.wake.notify_all();
        err
    }

    /// Checks what one member can check alone: the group has not failed, `rank` is a member and
    /// the arguments are consistent (`problem` says how not). A bad call fails the group.
    fn check_local(
        &self,
        rank: usize,
        call: Call,
        problem: Option<String>,
    ) -> Result<(), CommError> {
        let mut st = self.lock();
        if let Some(err) = &st.failure {
            return Err(err.clone());
        }
        let what = if rank >= self.size {
            format!(
                "rank {rank} called {call} on a group of {} members",
                self.size
            )
        } else if let Some(p) = problem {
            format!("rank {rank} called {call}: {p}")
        } else {
            return Ok(());
        };
        // No collective can be mid-way: the caller is not in one, so no barrier was released.
        Err(self.fail(&mut st, CommError::Mismatch { what }))
    }

    /// Waits until every member arrives at this barrier. At `Publish`, checks the call against
    /// the other members' and publishes `mine`.
    fn barrier(
        &self,
        rank: usize,
        call: Call,
        step: Step,
        mine: *mut f32,
    ) -> Result<(), CommError> {
        let mut st = self.lock();
        if step != Step::Publish && step == st.step {
            // We finished reading peers' buffers. (The group cannot have moved past this barrier
            // without us, so every member released into the reading phase decrements once.)
            st.reading -= 1;
            if st.reading == 0 && st.failure.is_some() {
                self.wake.notify_all();
            }
        }
        if let Err(err) = self.arrive(&mut st, rank, call, step, mine) {
            return Err(self.leave_failed(st, err));
        }
        let generation = st.generation;
        if st.arrived == self.size {
            st.arrived = 0;
            st.generation += 1;
            (st.step, st.reading) = match step {
                Step::Publish if call.op == "all_reduce" => (Step::Middle, self.size),
                Step::Publish | Step::Middle => (Step::Finish, self.size),
                Step::Finish => (Step::Publish, 0),
            };
            self.wake.notify_all();
            return Ok(());
        }
        let start = Instant::now();
        let deadline = start + self.timeout;
        loop {
            if st.generation != generation {
                return Ok(());
            }
            if let Some(err) = &st.failure {
                let err = err.clone();
                return Err(self.leave_failed(st, err));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = (0..self.size)
                    .filter(|&r| st.marks[r] != st.generation + 1)
                    .collect();
                let err = self.fail(
                    &mut st,
                    CommError::Timeout {
                        op: call.op,
                        waited: now - start,
                        missing,
                    },
                );
                return Err(self.leave_failed(st, err));
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Registers the arrival of `rank`, or says why it cannot arrive (failing the group).
    fn arrive(
        &self,
        st: &mut State,
        rank: usize,
        call: Call,
        step: Step,
        mine: *mut f32,
    ) -> Result<(), CommError> {
        if let Some(err) = &st.failure {
            return Err(err.clone());
        }
        let mismatch = match st.call {
            _ if st.marks[rank] == st.generation + 1 => {
                Some(format!("rank {rank} arrived twice at one barrier"))
            }
            _ if step != st.step => Some(format!(
                "rank {rank} arrived at the {step:?} barrier of {call} while the group is at {:?}",
                st.step
            )),
            Some((first, by)) if st.arrived > 0 && first != call => Some(format!(
                "rank {rank} called {call} but rank {by} called {first}"
            )),
            _ => None,
        };
        if let Some(what) = mismatch {
            return Err(self.fail(st, CommError::Mismatch { what }));
        }
        if st.arrived == 0 {
            st.call = Some((call, rank));
        }
        st.marks[rank] = st.generation + 1;
        st.arrived += 1;
        if step == Step::Publish {
            // Only after the checks, and only between collectives (the group is at `Publish`, so
            // nobody reads): a rejected caller's buffer is never read, a reader's never swapped.
            self.bufs[rank].store(mine, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Returns `err` once no member reads peers' buffers any more, so the caller's may be freed.
    /// The readers are between two barriers, doing a bounded amount of work, so this ends.
    fn leave_failed(&self, mut st: MutexGuard<'_, State>, err: CommError) -> CommError {
        while st.reading > 0 {
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        err
    }

    /// Reduces elements `range` over every member's published buffer, in rank order, into `dst`
    /// (`range.len()` elements).
    ///
    /// # Safety
    ///
    /// Every published buffer must be readable over `range` and not written during the call;
    /// `dst` must be writable for `range.len()` elements and read by nobody else meanwhile (it
    /// may be the caller's own published buffer at `range`: each block is read before written).
    unsafe fn reduce_chunk(&self, range: Range<usize>, op: ReduceOp, dst: *mut f32) {
        let mut acc = [0.0f32; BLOCK];
        let mut at = range.start;
        while at < range.end {
            let len = BLOCK.min(range.end - at);
            let acc = &mut acc[..len];
            let src = |m: usize| {
                // SAFETY: the caller guarantees buffer `m` is readable and unwritten over
                // `range`, which `at..at + len` lies within.
                unsafe {
                    std::slice::from_raw_parts(self.bufs[m].load(Ordering::Relaxed).add(at), len)
                }
            };
            acc.copy_from_slice(src(0));
            for m in 1..self.size {
                let s = src(m);
                match op {
                    ReduceOp::Sum => acc.iter_mut().zip(s).for_each(|(a, b)| *a += *b),
                    ReduceOp::Max => acc.iter_mut().zip(s).for_each(|(a, b)| *a = a.max(*b)),
                }
            }
            // SAFETY: the caller guarantees `dst` is writable over the range and not read by
            // others; no slice of it from `src` is alive any more.
            unsafe { std::slice::from_raw_parts_mut(dst.add(at - range.start), len) }
                .copy_from_slice(acc);
            at += len;
        }
    }
}

impl HostCollectives for ThreadGroup {
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, rank: usize, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        ThreadGroup::all_reduce(self, rank, buf, op)
    }

    fn all_gather(&self, rank: usize, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        ThreadGroup::all_gather(self, rank, local, out)
    }

    fn reduce_scatter(&self, rank: usize, input: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        ThreadGroup::reduce_scatter(self, rank, input, out)
    }

    fn abort(&self, rank: usize, why: &str) {
        ThreadGroup::abort(self, rank, why)
    }
}
