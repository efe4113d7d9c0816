//! The executor core: runs a partitioned [`ferrotron_partitioner::Plan`] forward and backward,
//! trains it and checks it against the unpartitioned model, on any backend. It implements no
//! backend and no process launcher: `ferrotron-cpu` and `ferrotron-cuda` implement [`Backend`]
//! and [`Comm`], `ferrotron-launch` runs ranks as processes.
//!
//! ```text
//! Plan ─► program: Executable (the steps, fused by fuse; kept values; last uses)
//!      ─► memory: the memory plan (the rank program's peak to the byte, an arena's offsets)
//!      ─► arena: on a host backend, each rank's values at those offsets in one allocation
//!      ─► launch: ranks as threads of this process (or one rank per process, ferrotron-launch)
//!      ─► rank: the rank program, the same on a thread or a process
//!            ├─ Backend: per-op compute on the device's tensors (kernel: what kernels share)
//!            └─ Comm: collectives over the rank's tp and dp groups (ThreadGroup in process)
//!      ─► run: every rank's results put back at full shape (the mesh's regions)
//!      ─► train: AdamW on each rank's shards (zero: on its share of them, the distributed
//!         optimizer); verify: compare with the unpartitioned model
//! ```
#![warn(missing_docs)]

pub mod arena;
pub mod backend;
pub mod comm;
pub mod error;
pub mod fuse;
pub mod init;
pub mod kernel;
pub mod launch;
pub mod link;
pub mod memory;
pub mod program;
pub mod rank;
pub mod run;
pub mod tensor;
pub mod thread_group;
pub mod train;
pub mod verify;
pub mod zero;

pub use arena::{Arena, ArenaStats, Buffer};
pub use backend::{AdamW, Backend};
pub use comm::{Comm, CommError, HostCollectives, ReduceOp, Rendezvous};
pub use error::{ExecError, GroupRanks};
pub use kernel::{KernelError, Placement, VocabShard};
pub use link::{Link, Mailbox, Tag};
pub use program::{Executable, RunOptions};
pub use rank::{Groups, Rank, RankResult, Span, TraceEvent};
pub use run::{
    gather_params, gather_stage_params, run, run_sharded, shard_params, shard_params_for,
    upload_params, weights_for, ParamSource, Run,
};
pub use tensor::Tensor;
pub use thread_group::ThreadGroup;
pub use train::{Batches, StepStats, TrainConfig, Trainer};
