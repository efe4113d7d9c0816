//! The runtimes: execute a partitioned [`ferrotron_partitioner::Plan`] on CPU threads or GPUs,
//! forward and backward, checked against the unpartitioned model.
//!
//! ```text
//! Plan ─► fuse: the program the ranks run (the plan's nodes; bias + activation and
//!         scale + softmax pairs fused into one step each)
//!      ─► exec: one thread per rank (or, under `launch`, one process) runs the program
//!            ├─ backend: cpu::kernels (f32; matmuls through `gemm`) or cuda (NVRTC kernels,
//!            │  cuBLAS), both behind the `Backend` trait
//!            └─ comm: collectives over the tp and dp groups (threads, TCP, NCCL)
//!      ─► loss, outputs, gradients (gathered to full shape by `verify`); `train` steps AdamW
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod cpu;
pub mod cuda;
pub mod exec;
pub mod fuse;
pub mod generate;
pub mod hf;
pub mod init;
pub mod launch;
pub mod safetensors_io;
pub mod tensor;
pub mod tokenizer;
pub mod train;
pub mod verify;

pub use exec::{
    gather_params, run, run_sharded, shard_params, ExecError, Run, RunOptions, TraceEvent,
};
pub use tensor::Tensor;
