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

/// Tunes glibc's allocator for this process's pattern: the executor frees every activation at
/// its last use and allocates the same sizes again in the next step. By default glibc serves
/// large blocks with fresh `mmap`s and returns freed heap memory to the system, so every step
/// page-faults its activations in again (a third of a training step's CPU time in system
/// calls). Up to 32 MiB now comes from the heap, and freed memory is kept for reuse.
/// `ferrotron train` on GPT-2 small (2 layers, tp 2, batch 4 × 256; BENCHMARKS.md): page
/// faults 482k → 155k, system time 1.17 → 0.42 s, the step 30–37% faster. Call once at start-up, before the work; a library
/// should leave the choice to its program, so only the CLI calls it.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc malloc parameters; any value is valid to pass, and a
    // refused one leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
