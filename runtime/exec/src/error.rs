//! Why a run failed: the rank and the node where it did, and what the kernel, the communicator
//! or the plan said.

use crate::comm::CommError;
use crate::kernel::KernelError;
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
    /// A collective failed (another rank failed, or they disagree).
    #[error("rank ({at}), node `{node}`: {error}")]
    Comm {
        /// The rank.
        at: Coord,
        /// The node (or the step of the program that communicated).
        node: String,
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

impl ExecError {
    /// Whether this rank only stopped because a peer failed (or a collective timed out): the
    /// error to report is the one that started it.
    pub fn is_peer_failure(&self) -> bool {
        matches!(self, ExecError::Comm { .. })
    }
}
