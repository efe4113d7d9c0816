//! The runtimes: execute a partitioned [`ferrotron_partitioner::Plan`] on CPU threads (CUDA to
//! come, issue 5), forward and backward, checked against the unpartitioned model.
//!
//! ```text
//! Plan ─► exec: one thread per rank runs the SPMD graph in order
//!            ├─ cpu::kernels: every op's local computation (f32; matmuls through `gemm`)
//!            └─ comm: in-process collectives over the tp and dp groups
//!       ─► loss, outputs, gradients (gathered to full shape by `verify`)
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod cpu;
pub mod cuda;
pub mod exec;
pub mod generate;
pub mod hf;
pub mod init;
pub mod launch;
pub mod safetensors_io;
pub mod tensor;
pub mod tokenizer;
pub mod train;
pub mod verify;

pub use exec::{gather_params, run, run_sharded, shard_params, ExecError, Run, RunOptions};
pub use tensor::Tensor;
