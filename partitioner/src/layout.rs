//! The layout algebra: how one tensor is held across the ranks of one mesh axis. Everything the
//! partitioner decides is a layout per value; every conversion between layouts is a known
//! collective. Which indices a layout gives each rank is [`crate::mesh`]'s.

use ferrotron_ir::op::MeshAxis;
use serde::{Deserialize, Serialize};
use std::fmt;

/// How a tensor is distributed over the ranks of one mesh axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layout {
    /// Every rank holds the whole tensor.
    Replicated,
    /// Rank `r` holds the `r`-th contiguous slice along this dimension.
    Split(usize),
    /// Every rank holds a full-shaped addend; the true value is the sum over ranks.
    Partial,
}

/// The default is what a value is before any decision: on every rank whole.
impl Default for Layout {
    fn default() -> Layout {
        Layout::Replicated
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Replicated => f.write_str("replicated"),
            Layout::Split(d) => write!(f, "split({d})"),
            Layout::Partial => f.write_str("partial"),
        }
    }
}

/// The collective (or local op) that converts `from` into `to` on `axis`, forward; `None` when
/// no conversion is needed. The backward of each is its conjugate (all-reduce ↔ identity,
/// all-gather ↔ reduce-scatter), which autodiff derives.
pub fn conversion(from: Layout, to: Layout) -> Option<Conversion> {
    use Layout::*;
    Some(match (from, to) {
        (a, b) if a == b => return None,
        (Partial, Replicated) => Conversion::AllReduce,
        (Partial, Split(d)) => Conversion::ReduceScatter(d),
        (Split(d), Replicated) => Conversion::AllGather(d),
        (Replicated, Split(d)) => Conversion::LocalSlice(d),
        (Split(d), Split(e)) => Conversion::AllToAll { from: d, to: e },
        // A replicated value read as a partial sum must count once: rank 0 keeps it, the others
        // hold zeros.
        (Replicated, Partial) => Conversion::KeepOnOneRank,
        (Split(d), Partial) => Conversion::GatherThenKeepOnOneRank(d),
        (Replicated, Replicated) | (Partial, Partial) => return None,
    })
}

/// A layout conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Conversion {
    /// Sum over the group (the paper's g, where it closes a row-parallel GEMM).
    AllReduce,
    /// Sum over the group, each rank keeping its slice along the dimension.
    ReduceScatter(usize),
    /// Concatenate the slices along the dimension.
    AllGather(usize),
    /// Take this rank's slice locally, no communication.
    LocalSlice(usize),
    /// Re-split along another dimension.
    AllToAll { from: usize, to: usize },
    /// Zero on every rank but the first.
    KeepOnOneRank,
    /// All-gather, then zero on every rank but the first.
    GatherThenKeepOnOneRank(usize),
}

/// A value's layout on both mesh axes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MeshLayout {
    /// Across the tensor-parallel group.
    pub tp: Layout,
    /// Across the data-parallel group.
    pub dp: Layout,
}

impl MeshLayout {
    /// Replicated on both axes.
    pub const REPLICATED: MeshLayout = MeshLayout {
        tp: Layout::Replicated,
        dp: Layout::Replicated,
    };

    /// The layout on one axis.
    pub fn on(&self, axis: MeshAxis) -> Layout {
        match axis {
            MeshAxis::Tp => self.tp,
            MeshAxis::Dp => self.dp,
        }
    }
}

impl fmt::Display for MeshLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tp: {}, dp: {}", self.tp, self.dp)
    }
}
