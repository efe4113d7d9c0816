//! A GPU and the ranks on it.
//!
//! [`Gpu::open`] checks that the driver and libraries load, creates the device's context and
//! compiles (or loads from the cache) the kernels for its architecture; it is shared by every
//! rank that runs on the device. [`Gpu::rank`] gives one rank its own stream and cuBLAS handle:
//! virtual ranks on one GPU run concurrently on separate streams, and one process per GPU (the
//! launcher) has exactly one.

use super::kernels::Kernels;
use super::libs::{self, Lib};
use super::tensor::DeviceBuffer;
use super::CudaError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use std::sync::{Arc, Mutex};

/// One GPU: its context and compiled kernels.
#[derive(Clone)]
pub struct Gpu {
    /// The device's primary context.
    pub ctx: Arc<CudaContext>,
    /// The kernels, compiled for [`Gpu::arch`].
    pub kernels: Arc<Kernels>,
    /// The device's architecture as NVRTC names it (`sm_90`).
    pub arch: String,
    /// The device's name (`NVIDIA H200`).
    pub name: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gpu({} #{}, {})",
            self.name,
            self.ctx.ordinal(),
            self.arch
        )
    }
}

/// Sets the release threshold of the device's default memory pool (the one `cuMemAllocAsync`,
/// every tensor's allocation, draws from) to its maximum. At the default, 0, the pool hands the
/// memory freed in a step back to the system at each synchronisation (the rank synchronises
/// after each pass), so every step would map its values afresh; kept, a steady step's
/// allocations are served from the pool (PyTorch's caching allocator does the same).
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), CudaError> {
    let mut threshold = u64::MAX;
    // SAFETY: RELEASE_THRESHOLD's value is a u64, which the driver reads.
    unsafe {
        pool_threshold(
            ctx,
            |pool, attr, value| sys::cuMemPoolSetAttribute(pool, attr, value),
            &mut threshold,
        )
    }
}

/// The release threshold of device `ordinal`'s default memory pool ([`keep_freed_memory`]).
pub fn pool_release_threshold(ordinal: usize) -> Result<u64, CudaError> {
    let ctx = CudaContext::new(ordinal)?;
    let mut threshold = 0u64;
    // SAFETY: RELEASE_THRESHOLD's value is a u64, which the driver writes.
    unsafe {
        pool_threshold(
            &ctx,
            |pool, attr, value| sys::cuMemPoolGetAttribute(pool, attr, value),
            &mut threshold,
        )?
    };
    Ok(threshold)
}

/// Calls `access` (the driver's get or set of a pool attribute) on the release threshold of
/// `ctx`'s device's default memory pool, with `value`.
///
/// # Safety
/// `access` must read or write one `u64` at the pointer it is given.
unsafe fn pool_threshold(
    ctx: &CudaContext,
    access: impl FnOnce(
        sys::CUmemoryPool,
        sys::CUmemPool_attribute,
        *mut std::ffi::c_void,
    ) -> sys::CUresult,
    value: &mut u64,
) -> Result<(), CudaError> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: the driver writes the pool handle of a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()? };
    let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    access(pool, attr, (value as *mut u64).cast()).result()?;
    Ok(())
}

impl Gpu {
    /// Opens device `ordinal`: a clean [`CudaError::Unavailable`] when the driver, a library or
    /// the device is missing.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        libs::require(&[Lib::Driver, Lib::Nvrtc, Lib::Cublas])?;
        let count = CudaContext::device_count().map_err(|e| {
            CudaError::Unavailable(format!("the CUDA driver found no usable device ({e})"))
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} asked for, the driver sees {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        keep_freed_memory(&ctx)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name()?;
        let kernels = Arc::new(Kernels::load(&ctx, &arch)?);
        Ok(Gpu {
            ctx,
            kernels,
            arch,
            name,
        })
    }

    /// A new rank on this GPU: its own stream and cuBLAS handle.
    pub fn rank(&self) -> Result<RankDevice, CudaError> {
        let stream = self.ctx.new_stream()?;
        let blas = Arc::new(CudaBlas::new(stream.clone())?);
        Ok(RankDevice {
            gpu: self.clone(),
            stream,
            blas,
            checks: Arc::default(),
        })
    }
}

/// What one rank computes with: the GPU, its stream and its cuBLAS handle (bound to the stream).
#[derive(Clone)]
pub struct RankDevice {
    /// The GPU the rank runs on.
    pub gpu: Gpu,
    /// The rank's stream: every kernel, GEMM and copy of the rank is queued on it.
    pub stream: Arc<CudaStream>,
    /// cuBLAS, on [`RankDevice::stream`].
    pub blas: Arc<CudaBlas>,
    /// Index checks queued on the stream and not yet read: read at the rank's next read from
    /// the device, so that checking a step's targets costs no synchronisation of its own.
    pub checks: Arc<Mutex<Vec<DeferredCheck>>>,
}

/// An index check whose result is still on the device: the first element of `values` (of `n`)
/// that is not an integer in `0..bound`, `u64::MAX` for none.
pub struct DeferredCheck {
    /// The op that checked.
    pub op: &'static str,
    /// What the values are (`target`).
    pub what: &'static str,
    /// The exclusive bound.
    pub bound: usize,
    /// The values' count.
    pub n: usize,
    /// The first bad element's index, written by the check's kernel.
    pub first: CudaSlice<u64>,
    /// The values checked (kept alive until the result is read, to report the bad value).
    pub values: Arc<DeviceBuffer<f32>>,
}

impl RankDevice {
    /// The GPU's kernels, compiled for it by NVRTC.
    pub fn kernels(&self) -> &Kernels {
        &self.gpu.kernels
    }
}
