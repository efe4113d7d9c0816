//! Communication between ranks, apart from computation: the collectives a rank runs over one of
//! its groups ([`Comm`], on its backend's tensors), and the host-buffer collectives that both the
//! in-process group ([`crate::ThreadGroup`], ranks as threads) and the TCP group of
//! `ferrotron-launch` (ranks as processes) implement ([`HostCollectives`]).
//!
//! ```text
//! rank program ─► Comm (one per mesh axis: the rank's tp group, its dp group)
//!                  ├─ CPU backend: a HostCollectives (ThreadGroup | TcpGroup) + the rank's index
//!                  └─ CUDA backend: virtual ranks on one GPU, or NCCL
//! ```
//!
//! Every implementation follows the same rules: a sum is taken in rank order, so results are the
//! same on every member and every run; nothing waits forever (every wait is bounded by the
//! group's timeout); and once a member aborts the group, or a call mismatches or times out, every
//! pending and later call fails with the same [`CommError`].

use crate::Backend;
use std::ops::Range;
use std::time::Duration;

/// How an all-reduce combines the members' elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum, in rank order.
    Sum,
    /// Maximum ([`f32::max`]: a NaN loses against a number).
    Max,
}

/// Why a collective failed. Once a group fails, every later call on it fails the same way.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CommError {
    /// Another member (or the caller itself earlier) aborted the group.
    #[error("rank {rank} failed: {why}")]
    PeerFailed {
        /// The member that aborted the group.
        rank: usize,
        /// Its reason.
        why: String,
    },
    /// Members did not all arrive within the group's timeout.
    #[error("{op}: {} within {waited:?}", absent(missing))]
    Timeout {
        /// The collective that was waiting.
        op: &'static str,
        /// How long it waited.
        waited: Duration,
        /// The members that had not arrived, as far as the waiting member can tell (empty when
        /// it cannot): their index in the group; for a pipeline receive, the sending rank.
        missing: Vec<usize>,
    },
    /// Members called different collectives or sizes (a plan bug, never a hang).
    #[error("collective mismatch: {what}")]
    Mismatch {
        /// What differed.
        what: String,
    },
}

/// How a timeout names the members that had not arrived.
fn absent(missing: &[usize]) -> String {
    match missing {
        [] => "not every member arrived".to_string(),
        [one] => format!("member {one} did not arrive"),
        more => format!(
            "members {} did not arrive",
            more.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Collectives on host `f32` buffers over a group of ranks, each member naming itself by its
/// `rank` in the group. The in-process [`crate::ThreadGroup`] and the launcher's TCP group
/// implement it with the same algorithm, so their results are bit-identical.
pub trait HostCollectives: Send + Sync + std::fmt::Debug {
    /// The number of members.
    fn size(&self) -> usize;
    /// Reduces every member's `buf` (equal lengths) elementwise into every member's `buf`.
    fn all_reduce(&self, rank: usize, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// Concatenates the members' `local` (equal lengths) in rank order into `out`.
    fn all_gather(&self, rank: usize, local: &[f32], out: &mut [f32]) -> Result<(), CommError>;
    /// Sums the members' `input` (equal lengths, a multiple of the size) and writes chunk `rank`
    /// of the sum into `out`.
    fn reduce_scatter(&self, rank: usize, input: &[f32], out: &mut [f32]) -> Result<(), CommError>;
    /// Fails the group: every member's pending and later collectives return
    /// [`CommError::PeerFailed`] promptly.
    fn abort(&self, rank: usize, why: &str);
}

/// One rank's membership of a group of ranks (a tensor- or data-parallel group): the collectives
/// it runs there, on its backend's tensors. A member knows its index in the group and the device
/// it computes on.
pub trait Comm<B: Backend>: Send + Sync + Sized {
    /// The members of a new group of ranks that are threads of this process, member `i`
    /// computing on `members[i]`; every wait is bounded by `timeout`.
    fn in_process(members: &[B], timeout: Duration) -> Vec<Self>;
    /// The number of members.
    fn size(&self) -> usize;
    /// This member's index in the group.
    fn index(&self) -> usize;
    /// Reduces a tensor over the group, in place.
    fn all_reduce(&self, t: &mut B::Tensor, op: ReduceOp) -> Result<(), CommError>;
    /// Reduces a host buffer (per-row statistics, a norm) over the group, in place.
    fn all_reduce_host(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// The group's tensors joined along `dim`, in rank order.
    fn all_gather(&self, t: &B::Tensor, dim: usize) -> Result<B::Tensor, CommError>;
    /// The group's tensors summed, this member keeping its part along `dim`.
    fn reduce_scatter(&self, t: &B::Tensor, dim: usize) -> Result<B::Tensor, CommError>;
    /// Fails the group (see [`HostCollectives::abort`]).
    fn abort(&self, why: &str);
    /// The plan node whose collectives come next, for a communicator that reports a hang from
    /// outside the waiting call (a watchdog); the others ignore it.
    fn note(&self, _node: &str) {}
}

/// A job-wide key-value store the ranks share (the launcher's rendezvous store), as a
/// communicator's watchdog uses it to learn how far the peers of a stuck collective got.
pub trait Rendezvous: Send + Sync {
    /// Sets `key` to `value`.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), String>;
    /// The value of `key`, if it is set, without waiting.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
}

/// One collective call, as the members of a host group must all agree on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// `all_reduce`, `all_gather` or `reduce_scatter`.
    pub op: &'static str,
    /// The reduction, for the reducing collectives.
    pub reduce: Option<ReduceOp>,
    /// Elements of each member's input.
    pub len: usize,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reduce {
            Some(r) => write!(f, "{}({r:?}) of {} elements", self.op, self.len),
            None => write!(f, "{} of {} elements", self.op, self.len),
        }
    }
}

/// The elements of chunk `i` when `n` are split into `parts` contiguous, nearly equal chunks
/// (the first `n % parts` one longer): which elements each member owns in a host all-reduce.
pub fn chunk(n: usize, parts: usize, i: usize) -> Range<usize> {
    let (q, r) = (n / parts, n % parts);
    let start = |i: usize| i * q + i.min(r);
    start(i)..start(i + 1)
}

/// What is wrong with a reduce-scatter's buffer lengths in a group of `size`, if anything.
pub fn reduce_scatter_problem(input: usize, out: usize, size: usize) -> Option<String> {
    if !input.is_multiple_of(size) {
        Some(format!(
            "input of {input} elements does not split over {size} members"
        ))
    } else if out != input / size {
        Some(format!("output has {out} elements, not {}", input / size))
    } else {
        None
    }
}
