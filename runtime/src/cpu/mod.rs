//! The CPU backend: `f32` kernels for every op of the IR, forward and backward.
//!
//! The executor (`crate::exec`) runs the partitioned SPMD graph with one thread per rank; for
//! each node it either runs a collective itself (`crate::comm`) or calls
//! [`kernels::eval`] on that rank's local tensors, with a [`kernels::Local`] saying where the
//! rank's shards sit in the full tensors (a vocabulary-parallel table's first row, a dropout
//! shard's offsets, the token shards a mean spans) and how many threads the kernel may use. A
//! vocabulary-parallel cross-entropy is computed in phases around the executor's reductions
//! ([`kernels::ce_row_max`], [`kernels::ce_row_sums`], [`kernels::ce_loss`],
//! [`kernels::ce_grad`]).
//!
//! Every kernel agrees with the reference evaluator ([`ferrotron_ir::reference`], `f64`) to
//! ~1e-6 relative (`runtime/tests/kernels.rs` checks each op). Matmuls run through the `gemm`
//! crate (`runtime/benches/matmul.rs` races it against OpenBLAS).

pub mod kernels;
pub(crate) mod layout;
pub(crate) mod math;
mod matmul;
mod par;
