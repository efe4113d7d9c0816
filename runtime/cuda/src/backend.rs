//! [`Cuda`]: the [`Backend`] the rank program computes with on NVIDIA GPUs.
//!
//! One `Cuda` value holds a GPU and a [`RankDevice`] (stream + cuBLAS handle) per rank that runs
//! on it; [`Backend::on_rank`] picks the rank's. Every op goes to [`super::kernels`]; the
//! collectives are the rank's [`CudaComm`]s: virtual ranks when the ranks share the GPU
//! ([`ferrotron_exec::Comm::in_process`]), NCCL when each rank has its own (one process per GPU
//! under `ferrotron launch`, [`Cuda::nccl_group`]).

use super::comm::{CudaComm, CudaGroup, NcclGroup};
use super::device::{Gpu, RankDevice};
use super::kernels;
use super::tensor::{self, CudaTensor, Storage};
use super::watchdog::{Hang, Watchdog};
use super::CudaError;
use ferrotron_exec::arena::Arena;
use ferrotron_exec::backend::{AdamW, Backend};
use ferrotron_exec::fuse::Fused;
use ferrotron_exec::kernel::{
    AttentionSaved, AttentionSpec, CeStats, KernelError, Placement, VocabShard,
};
use ferrotron_exec::Tensor;
use ferrotron_ir::{Dim, Op};
use std::sync::{Arc, Mutex};

/// The CUDA backend.
#[derive(Clone)]
pub struct Cuda {
    /// Every rank's device made so far, by rank (shared by all the views).
    ranks: Arc<Mutex<Vec<RankDevice>>>,
    /// The rank this view computes for.
    device: RankDevice,
    dtype: Storage,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({:?}, {:?})", self.device.gpu, self.dtype)
    }
}

impl Cuda {
    /// `ranks` virtual ranks on GPU `ordinal`, each with its own stream, storing activations and
    /// weights as `dtype` (ids and targets stay `f32`).
    pub fn new(ordinal: usize, ranks: usize, dtype: Storage) -> Result<Cuda, CudaError> {
        let gpu = Gpu::open(ordinal)?;
        let ranks = (0..ranks.max(1))
            .map(|_| gpu.rank())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Cuda {
            device: ranks[0].clone(),
            ranks: Arc::new(Mutex::new(ranks)),
            dtype,
        })
    }

    /// The device of the rank this value computes for.
    pub fn device(&self) -> &RankDevice {
        &self.device
    }

    /// The GPU every rank of this backend computes on.
    pub fn gpu(&self) -> &Gpu {
        &self.device.gpu
    }

    /// The storage type of weights and activations.
    pub fn dtype(&self) -> Storage {
        self.dtype
    }

    /// A new NCCL unique id (what a group's member 0 makes and shares with the others), as
    /// its 128 bytes.
    pub fn new_nccl_id() -> Result<[u8; 128], CudaError> {
        super::libs::require(&[super::libs::Lib::Nccl])?;
        let id = cudarc::nccl::Id::new()?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// A watchdog for this backend's NCCL groups (see [`Watchdog`]).
    pub fn watchdog(
        &self,
        timeout: std::time::Duration,
        store: Arc<dyn ferrotron_exec::Rendezvous>,
        on_hang: impl Fn(Hang) + Send + Sync + 'static,
    ) -> Watchdog {
        Watchdog::new(self.gpu().ctx.clone(), timeout, store, on_hang)
    }

    /// This rank's membership (`member` of `size`) of an NCCL group, from the unique id every
    /// member was given (`ferrotron launch` shares it through its rendezvous store); with a
    /// watchdog, its collectives are watched under the group's name `name`.
    pub fn nccl_group(
        &self,
        id: &[u8],
        member: usize,
        size: usize,
        watched: Option<(&Watchdog, &str)>,
    ) -> Result<CudaComm, CudaError> {
        super::libs::require(&[super::libs::Lib::Nccl])?;
        let internal: [u8; 128] = id.try_into().map_err(|_| {
            CudaError::Unavailable(format!("an NCCL id has 128 bytes, this one {}", id.len()))
        })?;
        let id = cudarc::nccl::Id::uninit(internal.map(|b| b as std::ffi::c_char));
        // The collectives get their own stream, so that an all-reduce runs while the compute
        // stream goes on with work that does not need it (Megatron's overlap of f's backward
        // all-reduce with the weight-gradient GEMM). cudarc's event tracking orders each buffer's
        // writes and reads across the two streams.
        let comm_stream = self.gpu().ctx.new_stream()?;
        let comm = cudarc::nccl::Comm::from_rank(comm_stream, member, size, id)?;
        let watch = watched.map(|(dog, name)| dog.watch(name, member, size));
        let group = Arc::new(CudaGroup::Nccl(NcclGroup::new(comm, watch)));
        Ok(CudaComm::new(group, member, self.device.clone()))
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Comm = CudaComm;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn on_rank(&self, rank: usize) -> Self {
        let mut ranks = self.ranks.lock().unwrap_or_else(|e| e.into_inner());
        // A rank beyond those made at the start gets its own stream and cuBLAS handle now: two
        // rank threads must never share a handle. A device that cannot make another stream has
        // a broken context, whose next call fails anyway; the view then keeps this one's device.
        while ranks.len() <= rank {
            match self.device.gpu.rank() {
                Ok(d) => ranks.push(d),
                Err(_) => break,
            }
        }
        let device = ranks
            .get(rank)
            .cloned()
            .unwrap_or_else(|| self.device.clone());
        Cuda {
            ranks: self.ranks.clone(),
            device,
            dtype: self.dtype,
        }
    }

    fn uses_arena(&self) -> bool {
        true
    }

    fn shares_on_clone(&self) -> bool {
        true
    }

    fn new_arena(&self, bytes: u64) -> Result<Arc<Arena>, KernelError> {
        tensor::new_arena(&self.device().stream, bytes).map_err(|e| KernelError::Device {
            op: "arena",
            msg: format!("allocating {bytes} bytes: {e}"),
        })
    }

    fn synchronize(&self) -> Result<(), KernelError> {
        self.device()
            .stream
            .synchronize()
            .map_err(|e| KernelError::Device {
                op: "synchronize",
                msg: e.to_string(),
            })?;
        kernels::read_checks(self.device())
    }

    fn upload(&self, t: &Tensor, dtype: ferrotron_ir::DType) -> Result<CudaTensor, KernelError> {
        // Ids stay exact: bf16 holds integers only up to 256.
        let storage = if dtype.is_int() {
            Storage::F32
        } else {
            self.dtype
        };
        kernels::upload(self.device(), t, storage)
    }

    fn download(&self, t: &CudaTensor) -> Result<Tensor, KernelError> {
        kernels::download(self.device(), t)
    }

    fn shape<'t>(&self, t: &'t CudaTensor) -> &'t [usize] {
        &t.shape
    }

    fn bytes(&self, t: &CudaTensor) -> usize {
        t.bytes()
    }

    fn element_bytes(&self, dtype: ferrotron_ir::DType) -> u64 {
        // As `upload` stores them: ids in `f32`, the rest in the storage type.
        match dtype.is_int() {
            true => 4,
            false => self.dtype.size() as u64,
        }
    }

    fn first_non_finite(&self, t: &CudaTensor) -> Option<f32> {
        // A device failure here surfaces at the next op; the check itself reports nothing.
        kernels::first_non_finite(self.device(), t).ok().flatten()
    }

    fn scalar(&self, value: f32) -> Result<CudaTensor, KernelError> {
        kernels::scalar(self.device(), value)
    }

    fn read_scalar(&self, t: &CudaTensor) -> Result<f32, KernelError> {
        let host = kernels::download(self.device(), t)?;
        Ok(host.data.first().copied().unwrap_or(0.0))
    }

    fn eval(
        &self,
        op: &Op<&CudaTensor, Dim>,
        at: &Placement,
    ) -> Result<Vec<CudaTensor>, KernelError> {
        kernels::eval(self.device(), op, at)
    }

    fn eval_fused(&self, op: &Fused<&CudaTensor>) -> Result<CudaTensor, KernelError> {
        kernels::eval_fused(self.device(), op)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<(CudaTensor, CudaTensor), KernelError> {
        kernels::attention(self.device(), q, k, v, spec, at)
    }

    fn attention_grad(
        &self,
        saved: AttentionSaved<&CudaTensor>,
        spec: &AttentionSpec,
        at: &Placement,
    ) -> Result<[CudaTensor; 3], KernelError> {
        let (dq, dk, dv) = kernels::attention_grad(self.device(), saved, spec, at)?;
        Ok([dq, dk, dv])
    }

    /// One pass over `x`, `bias` and `residual` instead of the three ops' two intermediate
    /// tensors, with the same mask and roundings (the same values to the bit).
    fn bias_dropout_add(
        &self,
        operands: (&CudaTensor, &CudaTensor, &CudaTensor),
        p: f64,
        at: &Placement,
    ) -> Result<CudaTensor, KernelError> {
        kernels::bias_dropout_add(self.device(), operands, p, at)
    }

    fn add_into(&self, acc: CudaTensor, x: &CudaTensor) -> Result<CudaTensor, KernelError> {
        kernels::add_into(self.device(), acc, x)
    }

    fn matmul_acc(
        &self,
        acc: CudaTensor,
        operands: (&CudaTensor, &CudaTensor),
        transposes: (bool, bool),
    ) -> Result<CudaTensor, KernelError> {
        kernels::matmul_acc(self.device(), acc, operands, transposes)
    }

    fn reshape(&self, mut t: CudaTensor, shape: Vec<usize>) -> CudaTensor {
        t.shape = shape;
        t
    }

    fn local_slice(
        &self,
        t: &CudaTensor,
        dim: usize,
        index: usize,
        parts: usize,
    ) -> Result<CudaTensor, KernelError> {
        kernels::local_slice(self.device(), t, dim, index, parts)
    }

    fn ce_row_max(
        &self,
        logits: &CudaTensor,
        shard: &VocabShard,
    ) -> Result<CudaTensor, KernelError> {
        kernels::ce_row_max_dev(self.device(), logits, shard)
    }

    fn ce_row_sums(
        &self,
        logits: &CudaTensor,
        max: &CudaTensor,
        targets: &CudaTensor,
        shard: &VocabShard,
    ) -> Result<CudaTensor, KernelError> {
        kernels::ce_row_sums_dev(self.device(), logits, max, targets, shard)
    }

    fn ce_loss(
        &self,
        stats: &CeStats<CudaTensor>,
        logits_shape: &[usize],
        shard: &VocabShard,
    ) -> Result<CudaTensor, KernelError> {
        kernels::ce_loss_dev(self.device(), stats, logits_shape, shard)
    }

    fn ce_grad(
        &self,
        logits: &CudaTensor,
        targets: &CudaTensor,
        stats: &CeStats<CudaTensor>,
        shard: &VocabShard,
        dloss: &CudaTensor,
    ) -> Result<CudaTensor, KernelError> {
        kernels::ce_grad_dev(self.device(), logits, targets, stats, shard, dloss)
    }

    /// Over the logits' own buffer (`ce_grad_inplace`), so that a fused output layer's chunk
    /// holds one `[rows, classes]` buffer on the device instead of two.
    fn ce_grad_in_place(
        &self,
        logits: CudaTensor,
        targets: &CudaTensor,
        stats: &CeStats<CudaTensor>,
        shard: &VocabShard,
        dloss: &CudaTensor,
    ) -> Result<CudaTensor, KernelError> {
        kernels::ce_grad_in_place_dev(self.device(), logits, targets, stats, shard, dloss)
    }

    fn sum_squares(&self, t: &CudaTensor) -> Result<f64, KernelError> {
        kernels::sum_squares(self.device(), t)
    }

    fn sum_squares_all(&self, ts: &[&CudaTensor]) -> Result<f64, KernelError> {
        kernels::sum_squares_all(self.device(), ts)
    }

    fn upload_master(&self, t: &Tensor) -> Result<CudaTensor, KernelError> {
        kernels::upload(self.device(), t, Storage::F32)
    }

    fn compute_weights(&self, master: &CudaTensor) -> Result<Option<CudaTensor>, KernelError> {
        if master.dtype() == self.dtype {
            Ok(None)
        } else {
            kernels::cast(self.device(), master, self.dtype).map(Some)
        }
    }

    fn adamw(
        &self,
        w: &mut CudaTensor,
        g: &CudaTensor,
        moments: (&mut CudaTensor, &mut CudaTensor),
        update: AdamW,
    ) -> Result<(), KernelError> {
        kernels::adamw(self.device(), w, g, moments, update)
    }
}
