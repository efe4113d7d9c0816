//! Launching a kernel of [`super::spec`]: output buffers, launch shapes, and [`Launch`], the
//! argument builder that checks every argument against the kernel's entry in the list.

use super::spec::{KernelSpec, Param};
use super::structs::{AdamWParams, DropShape, Gather, Inputs, Strided2, SumToShape, Tile};
use crate::device::RankDevice;
use crate::tensor::{CudaTensor, DeviceBuffer, DeviceData, Storage};
use cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, DriverError, LaunchArgs, LaunchConfig, PushKernelArg,
};
use ferrotron_exec::kernel::KernelError;
use half::bf16;

pub(crate) type Result<T, E = KernelError> = std::result::Result<T, E>;

/// A driver failure of `op` as a [`KernelError::Device`].
pub(crate) fn device(op: &'static str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Device {
        op,
        msg: e.to_string(),
    }
}

/// `|e| device(op, e)`, for `map_err`.
pub(crate) fn on(op: &'static str) -> impl Fn(DriverError) -> KernelError {
    move |e| device(op, e)
}

/// A kernel's output buffer of one storage type before it becomes a [`CudaTensor`]: at its
/// planned place in the rank's arena where one is offered ([`DeviceBuffer::uninit`]), else from
/// the memory pool.
pub(crate) enum Buf {
    F32(DeviceBuffer<f32>),
    Bf16(DeviceBuffer<bf16>),
}

/// Elements a buffer of `n` elements allocates: CUDA cannot allocate 0 bytes, so an empty
/// tensor holds one unused element (its shape still says 0; counts come from the shape).
pub(crate) fn alloc_len(n: usize) -> usize {
    n.max(1)
}

impl Buf {
    /// `n` uninitialized elements of `dtype` on the rank's stream; the kernel that receives it
    /// must write every element.
    pub(crate) fn uninit(
        dev: &RankDevice,
        op: &'static str,
        dtype: Storage,
        n: usize,
    ) -> Result<Buf> {
        let len = alloc_len(n);
        // SAFETY: the memory is left unset; every caller launches a kernel that writes all of
        // the tensor's elements before anything reads them (the one spare element of an empty
        // tensor is never read).
        unsafe {
            Ok(match dtype {
                Storage::F32 => Buf::F32(DeviceBuffer::uninit(&dev.stream, len).map_err(on(op))?),
                Storage::Bf16 => Buf::Bf16(DeviceBuffer::uninit(&dev.stream, len).map_err(on(op))?),
            })
        }
    }

    /// `n` zeros of `dtype`.
    pub(crate) fn zeros(
        dev: &RankDevice,
        op: &'static str,
        dtype: Storage,
        n: usize,
    ) -> Result<Buf> {
        let len = alloc_len(n);
        Ok(match dtype {
            Storage::F32 => Buf::F32(DeviceBuffer::zeros(&dev.stream, len).map_err(on(op))?),
            Storage::Bf16 => Buf::Bf16(DeviceBuffer::zeros(&dev.stream, len).map_err(on(op))?),
        })
    }

    pub(crate) fn into_tensor(self, shape: Vec<usize>) -> CudaTensor {
        match self {
            Buf::F32(s) => CudaTensor::f32(shape, s),
            Buf::Bf16(s) => CudaTensor::bf16(shape, s),
        }
    }
}

/// `src` copied to the host, on the rank's stream (after its pending writes), the stream then
/// synchronized: cudarc's `clone_dtoh` into a `Vec` (pageable memory) issues
/// `cuMemcpyDtoHAsync` and returns without waiting, relying on the driver making pageable copies
/// synchronous, which CUDA documents only as "might be"; the explicit wait makes the result
/// final before it is read (the stream is already drained in practice, so it costs nothing).
pub(crate) fn to_host<T: DeviceRepr>(
    dev: &RankDevice,
    op: &'static str,
    src: &CudaView<'_, T>,
) -> Result<Vec<T>> {
    let v = read_back(dev, op, src)?;
    // The checks queued before this read are done too: report the first that failed.
    super::read_checks(dev)?;
    Ok(v)
}

/// A copy of `src` on the host, waiting for the stream (without reading the deferred checks).
pub(crate) fn read_back<T: DeviceRepr>(
    dev: &RankDevice,
    op: &'static str,
    src: &CudaView<'_, T>,
) -> Result<Vec<T>> {
    let v = dev.stream.clone_dtoh(src).map_err(on(op))?;
    dev.stream.synchronize().map_err(on(op))?;
    Ok(v)
}

/// An f32 scratch buffer of `n` uninitialized elements (partial sums, row statistics).
pub(crate) fn scratch(dev: &RankDevice, op: &'static str, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: as in `Buf::uninit`: the kernel that receives it writes what is later read.
    unsafe { dev.stream.alloc::<f32>(alloc_len(n)) }.map_err(on(op))
}

/// An i64 scratch buffer of `n` uninitialized elements (the embedding gradient's row order).
pub(crate) fn scratch_i64(dev: &RankDevice, op: &'static str, n: usize) -> Result<CudaSlice<i64>> {
    // SAFETY: as in `Buf::uninit`: the kernel that receives it writes what is later read.
    unsafe { dev.stream.alloc::<i64>(alloc_len(n)) }.map_err(on(op))
}

/// An f64 scratch buffer of `n` uninitialized elements (the norms' row statistics).
pub(crate) fn scratch_f64(dev: &RankDevice, op: &'static str, n: usize) -> Result<CudaSlice<f64>> {
    // SAFETY: as in `Buf::uninit`: the kernel that receives it writes what is later read.
    unsafe { dev.stream.alloc::<f64>(alloc_len(n)) }.map_err(on(op))
}

// ---------------------------------------------------------------------------------------------
// Launch shapes

/// Threads per block of the elementwise kernels.
pub(crate) const BLOCK: u32 = 256;

/// At most this many blocks per SM are launched; grid-stride loops cover the rest (a few
/// waves of resident blocks, no tail of tiny ones).
const BLOCKS_PER_SM: u32 = 32;

fn max_blocks(dev: &RankDevice) -> u32 {
    dev.kernels().sm_count().max(1) * BLOCKS_PER_SM
}

/// One thread per element (grid-strided).
pub(crate) fn cfg_1d(dev: &RankDevice, n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(BLOCK as usize)
        .clamp(1, max_blocks(dev) as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of `n` elements (grid-strided over rows). The block size depends on `n`
/// only (a multiple of 32, up to 512: a few elements per thread), so each row's reduction order
/// is the same on every run and device.
pub(crate) fn cfg_rows(dev: &RankDevice, rows: usize, n: usize) -> LaunchConfig {
    let threads = (n.div_ceil(4).next_multiple_of(32)).clamp(32, 512) as u32;
    let blocks = rows.clamp(1, max_blocks(dev) as usize * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A 2-D launch over `outer` rows of `len` elements: x along the row, y across rows, 256
/// threads a block (short rows share a block).
pub(crate) fn cfg_2d(dev: &RankDevice, outer: usize, len: usize) -> LaunchConfig {
    let tx = len.next_power_of_two().clamp(32, BLOCK as usize) as u32;
    let ty = BLOCK / tx;
    let gx = len.div_ceil(tx as usize).clamp(1, max_blocks(dev) as usize) as u32;
    let gy_cap = (max_blocks(dev) / gx).clamp(1, 65_535) as usize;
    let gy = outer.div_ceil(ty as usize).clamp(1, gy_cap) as u32;
    LaunchConfig {
        grid_dim: (gx, gy, 1),
        block_dim: (tx, ty, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` as a kernel's `long long`.
pub(crate) fn i64_of(op: &'static str, n: usize) -> Result<i64> {
    i64::try_from(n).map_err(|_| ferrotron_exec::kernel::invalid(op, format!("{n} is too large")))
}

// ---------------------------------------------------------------------------------------------
// The argument builder

/// A scalar or struct a kernel takes by value, with its kind in [`Param`].
pub(crate) trait KernelValue: DeviceRepr {
    const KIND: Param;
}

impl KernelValue for i64 {
    const KIND: Param = Param::I64;
}
impl KernelValue for u64 {
    const KIND: Param = Param::U64;
}
impl KernelValue for i32 {
    const KIND: Param = Param::I32;
}
impl KernelValue for f32 {
    const KIND: Param = Param::F32;
}
impl KernelValue for f64 {
    const KIND: Param = Param::F64;
}

macro_rules! struct_values {
    ($($t:ty),*) => {
        $(impl KernelValue for $t {
            const KIND: Param = Param::Struct(std::mem::size_of::<$t>());
        })*
    };
}
struct_values!(
    Strided2,
    DropShape,
    Gather,
    Tile,
    SumToShape,
    Inputs,
    AdamWParams
);

/// The arguments of one launch of `spec`, checked one by one against the spec's parameter
/// kinds; [`Launch::launch`] refuses a launch whose arguments did not match (a bug in the
/// launch code, reported instead of corrupting memory).
pub(crate) struct Launch<'a> {
    op: &'static str,
    spec: &'static KernelSpec,
    symbol: String,
    args: LaunchArgs<'a>,
    pushed: usize,
    mismatch: Option<String>,
}

impl<'a> Launch<'a> {
    /// A launch of `spec` (its `dtype` instantiation when typed) on the rank's stream.
    pub(crate) fn new(
        dev: &'a RankDevice,
        op: &'static str,
        spec: &'static KernelSpec,
        dtype: Storage,
    ) -> Result<Launch<'a>> {
        let symbol = if spec.typed {
            format!("{}_{}", spec.name, dtype.suffix())
        } else {
            spec.name.to_string()
        };
        let f = dev.kernels().function(&symbol).ok_or_else(|| {
            device(
                op,
                format!("kernel `{symbol}` is not loaded (missing from the list?)"),
            )
        })?;
        Ok(Launch {
            op,
            spec,
            symbol,
            args: dev.stream.launch_builder(f),
            pushed: 0,
            mismatch: None,
        })
    }

    fn check(&mut self, kind: Param) {
        let want = self.spec.params.get(self.pushed).copied();
        if want != Some(kind) && self.mismatch.is_none() {
            self.mismatch = Some(format!(
                "argument {} of `{}` is {kind:?}, the kernel takes {want:?}",
                self.pushed, self.symbol
            ));
        }
        self.pushed += 1;
    }

    /// A scalar or struct by value.
    pub(crate) fn val<T: KernelValue>(&mut self, v: &'a T) -> &mut Self {
        self.check(T::KIND);
        self.args.arg(v);
        self
    }

    /// A tensor's buffer, read by the kernel.
    pub(crate) fn input(&mut self, d: &'a DeviceData) -> &mut Self {
        self.check(Param::Ptr);
        match d {
            DeviceData::F32(s) => self.args.arg(&***s),
            DeviceData::Bf16(s) => self.args.arg(&***s),
        };
        self
    }

    /// A buffer the kernel reads.
    pub(crate) fn slice<T>(&mut self, s: &'a CudaSlice<T>) -> &mut Self {
        self.check(Param::Ptr);
        self.args.arg(s);
        self
    }

    /// A buffer the kernel writes.
    pub(crate) fn slice_mut<T>(&mut self, s: &'a mut CudaSlice<T>) -> &mut Self {
        self.check(Param::Ptr);
        self.args.arg(s);
        self
    }

    /// A raw device address the caller got through cudarc's `device_ptr(_mut)` on this
    /// launch's stream (its guard, alive until after the launch, orders and records the access).
    pub(crate) fn ptr(&mut self, p: &'a u64) -> &mut Self {
        self.check(Param::Ptr);
        self.args.arg(p);
        self
    }

    /// An output buffer.
    pub(crate) fn output(&mut self, b: &'a mut Buf) -> &mut Self {
        self.check(Param::Ptr);
        match b {
            Buf::F32(s) => self.args.arg(&mut **s),
            Buf::Bf16(s) => self.args.arg(&mut **s),
        };
        self
    }

    /// Queues the kernel on the rank's stream.
    pub(crate) fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        if let Some(m) = self.mismatch.take() {
            return Err(device(self.op, m));
        }
        if self.pushed != self.spec.params.len() {
            return Err(device(
                self.op,
                format!(
                    "`{}` takes {} arguments, the launch passed {}",
                    self.symbol,
                    self.spec.params.len(),
                    self.pushed
                ),
            ));
        }
        // SAFETY: the arguments match the kernel's parameters in number and kind (checked
        // above against the list that the compile test checks against the PTX); every buffer
        // passed is large enough for the indices the kernel computes from the sizes passed
        // with it (each launch site allocates or checks them); cudarc orders the launch after
        // the buffers' pending writes and records its reads and writes.
        unsafe { self.args.launch(cfg) }
            .map(|_| ())
            .map_err(|e| device(self.op, format!("launching `{}`: {e}", self.symbol)))
    }
}
