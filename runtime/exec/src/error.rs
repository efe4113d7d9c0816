//! Why a run failed: the rank and the node where it did, and what the kernel, the communicator
//! or the plan said.

use crate::comm::CommError;
use crate::kernel::KernelError;
use ferrotron_ir::MeshAxis;
use ferrotron_partitioner::Coord;
use thiserror::Error;

/// Why a run failed.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum ExecError {
    /// A full weight or input is missing or has the wrong shape.
    #[error("{what} `{name}`: {problem}")]
    Feed {
        /// `parameter` or `input`.
        what: &'static str,
        /// The parameter's or input's name.
        name: String,
        /// What is wrong (with both shapes).
        problem: String,
    },
    /// A kernel failed on a node.
    #[error("rank ({at}), node `{node}`: {error}")]
    Kernel {
        /// The rank.
        at: Coord,
        /// The node's name.
        node: String,
        /// What the kernel said.
        error: KernelError,
    },
    /// A collective failed (another rank failed, they disagree, or not all arrived in time).
    #[error("rank ({at}), node `{node}`{}", comm_text(group, error))]
    Comm {
        /// The rank.
        at: Coord,
        /// The node (or the step of the program that communicated).
        node: String,
        /// The group the collective ran over, when it was one of the rank's groups (boxed: an
        /// error travels in every `Result` of the run).
        group: Option<Box<GroupRanks>>,
        /// What the communicator said.
        error: CommError,
    },
    /// The plan cannot be run as it is.
    #[error("{0}")]
    Plan(String),
    /// A node produced a NaN or an infinity (with `check_finite`).
    #[error("rank ({at}): node `{node}` produced {value} (the first non-finite value)")]
    NonFinite {
        /// The rank.
        at: Coord,
        /// The node's name.
        node: String,
        /// The non-finite value (NaN or ±∞).
        value: f32,
    },
    /// A rank's thread panicked.
    #[error("rank ({at}) panicked: {why}")]
    Panic {
        /// The rank.
        at: Coord,
        /// The panic message.
        why: String,
    },
}

/// One of a rank's groups: its mesh axis and the job ranks of its members, in member order.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRanks {
    /// The mesh axis.
    pub axis: MeshAxis,
    /// Member `i`'s job rank at `i`.
    pub ranks: Vec<usize>,
}

/// The group and the communicator's error; a timeout names the job ranks that had not arrived.
fn comm_text(group: &Option<Box<GroupRanks>>, error: &CommError) -> String {
    let Some(g) = group else {
        return format!(": {error}");
    };
    let axis = match g.axis {
        MeshAxis::Tp => "tp",
        MeshAxis::Dp => "dp",
    };
    let list = |ranks: &mut dyn Iterator<Item = usize>| {
        ranks.map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
    };
    let of = format!(
        ", {axis} group of ranks {}",
        list(&mut g.ranks.iter().copied())
    );
    match error {
        CommError::Timeout {
            op,
            waited,
            missing,
        } if !missing.is_empty() => {
            let mut ranks = missing.iter().filter_map(|&m| g.ranks.get(m).copied());
            let who = list(&mut ranks);
            let verb = if missing.len() == 1 {
                format!("rank {who} had")
            } else {
                format!("ranks {who} had")
            };
            format!("{of}: {op}: {verb} not arrived after {waited:?}")
        }
        _ => format!("{of}: {error}"),
    }
}

impl ExecError {
    /// Whether this rank only stopped because a peer failed (or a collective timed out): the
    /// error to report is the one that started it.
    pub fn is_peer_failure(&self) -> bool {
        matches!(self, ExecError::Comm { .. })
    }
}
