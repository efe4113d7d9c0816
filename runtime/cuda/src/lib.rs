//! The CUDA backend: partitioned plans on NVIDIA GPUs.
//!
//! Where it sits in the data flow: the rank program (`ferrotron-exec`) walks a rank's SPMD graph
//! and asks its [`ferrotron_exec::Backend`] for each op's local computation and its
//! [`ferrotron_exec::Comm`] for each collective. The CUDA backend ([`Cuda`], [`CudaComm`])
//! answers with device tensors ([`CudaTensor`], stored as [`Storage`]); it shares no code with
//! the CPU backend, only the core's types:
//!
//! * [`libs`] finds the CUDA libraries at run time (cudarc's dynamic loading), so that the
//!   workspace builds and tests on machines with no CUDA; an absent driver or library is a clean
//!   [`CudaError::Unavailable`], never a panic;
//! * [`nvrtc`] holds the kernels' CUDA C sources and compiles them with NVRTC for the device's
//!   architecture at start-up (cached on disk); [`kernels`] launches them, and cuBLAS for the
//!   GEMMs, one IR op at a time, in `f32` (checked against the CPU backend) or bf16 storage with
//!   `f32` arithmetic;
//! * [`device`] owns a GPU (context, compiled module) and each rank's stream and cuBLAS handle;
//! * [`comm`] is the communicator: virtual ranks on one GPU (a stream each, device-side
//!   reductions) and NCCL across GPUs and processes;
//! * [`bench`](mod@bench) is the GPU benchmark (one 8.3B-shaped layer against a large GEMM),
//!   run by `benches/gpu_layer.rs` and, at a small shape, by the tests.

pub mod backend;
pub mod bench;
pub mod comm;
pub mod device;
pub mod kernels;
pub mod libs;
pub mod nvrtc;
pub mod tensor;
pub mod watchdog;

pub use backend::Cuda;
pub use comm::CudaComm;
pub use device::{Gpu, RankDevice};
pub use tensor::{CudaTensor, DeviceData, Storage};
pub use watchdog::{Hang, Watchdog};

/// Why the CUDA backend could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The driver, a library or a device is missing: the message says which and what to do.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {source_name} for {arch}: {log}")]
    Compile {
        /// The source file (`elementwise.cu`).
        source_name: String,
        /// The architecture it was compiled for (`sm_90`).
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// An NCCL call failed.
    #[error("NCCL: {0:?}")]
    Nccl(cudarc::nccl::result::NcclError),
}

impl From<cudarc::nccl::result::NcclError> for CudaError {
    fn from(e: cudarc::nccl::result::NcclError) -> Self {
        CudaError::Nccl(e)
    }
}
