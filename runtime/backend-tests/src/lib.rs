//! The cross-backend tests live in `tests/`: the CUDA backend against the CPU backend, op by op
//! (`cuda_ops.rs`) and model by model (`cuda_equivalence.rs`), on a GPU or, with no GPU, on the
//! CPU stand-in for the CUDA libraries (`cuda_emulated.rs`). They are a crate of their own so
//! that neither backend depends on the other.
