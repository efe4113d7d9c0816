//! The CUDA backend's communicators.
//!
//! A rank's membership of a group is a [`CudaComm`] (the rank program's [`Comm`]): a
//! [`CudaGroup`] shared by the members, the member's index, and its device. Two kinds of group:
//!
//! * [`VirtualGroup`]: several ranks on **one GPU**, each a thread with its own stream, so that a
//!   tp = 4 plan runs, and is verified, on a single device. The members exchange their device
//!   tensors (reference-counted handles, not copies) through a host-side rendezvous, and each
//!   member reduces or gathers the peers' buffers with its own kernels on its own stream, in rank
//!   order, so every member computes bit-identical results. Cross-stream order is explicit:
//!
//!   ```text
//!   publish tensor ─exchange─ wait peers' "written" events; reduce/gather into a new buffer;
//!                              record "read" ─exchange─ wait peers' "read" events ─ return
//!   ```
//!
//!   The last wait keeps every member from reusing or freeing its input while a peer's kernel
//!   may still be reading it.
//! * [`NcclGroup`]: one rank per GPU (one process per GPU under `ferrotron launch`, or one
//!   thread per GPU), NCCL collectives on the rank's stream.
//!
//! The vocabulary-parallel cross-entropy's per-row statistics are device tensors, reduced like
//! any other (no host round trip inside a step); host buffers (a norm, a loss addend) go through
//! the CPU communicator on virtual ranks and through a small device buffer on NCCL.

use super::device::RankDevice;
use super::kernels;
use super::tensor::{CudaTensor, DeviceData};
use super::watchdog::Watch;
use super::Cuda;
use cudarc::driver::CudaEvent;
use cudarc::nccl::{Comm as NcclComm, ReduceOp as NcclOp};
use ferrotron_exec::comm::{Comm, CommError, ReduceOp};
use ferrotron_exec::kernel::KernelError;
use ferrotron_exec::ThreadGroup;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A communicator group of the CUDA backend.
pub enum CudaGroup {
    /// Ranks on one GPU.
    Virtual(VirtualGroup),
    /// Ranks on separate GPUs, through NCCL.
    Nccl(NcclGroup),
}

impl std::fmt::Debug for CudaGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaGroup::Virtual(g) => write!(f, "VirtualGroup({} members)", g.size),
            CudaGroup::Nccl(g) => write!(f, "NcclGroup({} members)", g.size),
        }
    }
}

impl CudaGroup {
    /// The number of members.
    pub fn size(&self) -> usize {
        match self {
            CudaGroup::Virtual(g) => g.size,
            CudaGroup::Nccl(g) => g.size,
        }
    }
}

/// A failed device operation inside a collective, as the collective's error.
fn device_failure(op: &'static str, e: impl std::fmt::Display) -> CommError {
    CommError::Mismatch {
        what: format!("{op} on the device failed: {e}"),
    }
}

/// A host-side rendezvous of `size` members: each deposits one item, and once all have, each
/// gets every member's item in rank order. Failures and timeouts behave as in
/// [`ThreadGroup`]: once failed, every pending and later exchange returns the error.
struct Exchange<T> {
    size: usize,
    timeout: Duration,
    state: Mutex<ExchangeState<T>>,
    wake: Condvar,
}

struct ExchangeState<T> {
    generation: u64,
    deposited: Vec<Option<T>>,
    arrived: usize,
    /// The items of the last completed round: a member that has not yet picked them up cannot
    /// be overtaken, since the next round needs it to complete.
    last: Arc<Vec<T>>,
    failure: Option<CommError>,
}

impl<T: Clone> Exchange<T> {
    fn new(size: usize, timeout: Duration) -> Exchange<T> {
        Exchange {
            size,
            timeout,
            state: Mutex::new(ExchangeState {
                generation: 0,
                deposited: (0..size).map(|_| None).collect(),
                arrived: 0,
                last: Arc::new(Vec::new()),
                failure: None,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ExchangeState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exchange(&self, op: &'static str, rank: usize, item: T) -> Result<Arc<Vec<T>>, CommError> {
        let mut st = self.lock();
        if let Some(e) = &st.failure {
            return Err(e.clone());
        }
        if rank >= self.size || st.deposited[rank].is_some() {
            let e = CommError::Mismatch {
                what: format!(
                    "rank {rank} entered {op} twice or is not among {}",
                    self.size
                ),
            };
            st.failure = Some(e.clone());
            self.wake.notify_all();
            return Err(e);
        }
        st.deposited[rank] = Some(item);
        st.arrived += 1;
        let generation = st.generation;
        if st.arrived == self.size {
            let items = st
                .deposited
                .iter_mut()
                .map(|d| d.take())
                .collect::<Option<Vec<T>>>();
            st.last = Arc::new(items.unwrap_or_default());
            st.arrived = 0;
            st.generation += 1;
            self.wake.notify_all();
            return Ok(st.last.clone());
        }
        let start = Instant::now();
        let deadline = start + self.timeout;
        loop {
            if st.generation != generation {
                return Ok(st.last.clone());
            }
            if let Some(e) = &st.failure {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = (0..self.size)
                    .filter(|&r| st.deposited[r].is_none())
                    .collect();
                let e = CommError::Timeout {
                    op,
                    waited: now - start,
                    missing,
                };
                st.failure = Some(e.clone());
                self.wake.notify_all();
                return Err(e);
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn abort(&self, rank: usize, why: &str) {
        let mut st = self.lock();
        st.failure.get_or_insert(CommError::PeerFailed {
            rank,
            why: why.to_string(),
        });
        self.wake.notify_all();
    }
}

/// What a member publishes in a virtual-rank collective.
#[derive(Clone)]
enum Published {
    /// Its tensor, written (on its stream) up to the event.
    Tensor(CudaTensor, Arc<CudaEvent>),
    /// It finished reading its peers' tensors (on its stream) up to the event.
    Read(Arc<CudaEvent>),
}

/// Ranks on one GPU, each on its own stream. See the module docs for the protocol.
pub struct VirtualGroup {
    size: usize,
    exchange: Exchange<Published>,
    /// The host-buffer reductions (the cross-entropy's statistics).
    host: Arc<ThreadGroup>,
}

impl VirtualGroup {
    /// A group of `size` members; `timeout` bounds every wait.
    pub fn new(size: usize, timeout: Duration) -> VirtualGroup {
        VirtualGroup {
            size,
            exchange: Exchange::new(size, timeout),
            host: ThreadGroup::new(size.max(1), timeout),
        }
    }

    /// Publishes `t` and returns every member's tensor, each readable on `dev`'s stream.
    fn publish(
        &self,
        op: &'static str,
        dev: &RankDevice,
        rank: usize,
        t: &CudaTensor,
    ) -> Result<Vec<CudaTensor>, CommError> {
        let written = record(dev).map_err(|e| device_failure(op, e))?;
        let all = self
            .exchange
            .exchange(op, rank, Published::Tensor(t.clone(), written))?;
        let mut tensors = Vec::with_capacity(self.size);
        for p in all.iter() {
            match p {
                Published::Tensor(x, written) => {
                    dev.stream
                        .wait(written)
                        .map_err(|e| device_failure(op, e))?;
                    if x.shape != t.shape || x.dtype() != t.dtype() {
                        let what = format!(
                            "{op}: members hold {:?} {:?} and {:?} {:?}",
                            x.shape,
                            x.dtype(),
                            t.shape,
                            t.dtype()
                        );
                        self.exchange.abort(rank, &what);
                        return Err(CommError::Mismatch { what });
                    }
                    tensors.push(x.clone());
                }
                Published::Read(_) => {
                    let what = format!("{op}: members are at different steps");
                    self.exchange.abort(rank, &what);
                    return Err(CommError::Mismatch { what });
                }
            }
        }
        Ok(tensors)
    }

    /// Announces that this member's reads of its peers are queued, and waits (on the stream)
    /// until every member's are done, so that no input is reused while a peer still reads it.
    fn finish(&self, op: &'static str, dev: &RankDevice, rank: usize) -> Result<(), CommError> {
        let read = record(dev).map_err(|e| device_failure(op, e))?;
        let all = self.exchange.exchange(op, rank, Published::Read(read))?;
        for p in all.iter() {
            if let Published::Read(e) = p {
                dev.stream.wait(e).map_err(|e| device_failure(op, e))?;
            }
        }
        Ok(())
    }

    fn all_reduce(
        &self,
        dev: &RankDevice,
        rank: usize,
        t: &mut CudaTensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        const OP: &str = "all_reduce";
        let peers = self.publish(OP, dev, rank, t)?;
        let inputs: Vec<&CudaTensor> = peers.iter().collect();
        let mut out =
            kernels::zeros(dev, &t.shape, t.dtype()).map_err(|e| device_failure(OP, e))?;
        kernels::reduce_buffers(dev, &mut out, &inputs, op).map_err(|e| device_failure(OP, e))?;
        drop(inputs);
        drop(peers);
        self.finish(OP, dev, rank)?;
        *t = out;
        Ok(())
    }

    fn all_gather(
        &self,
        dev: &RankDevice,
        rank: usize,
        t: &CudaTensor,
        dim: usize,
    ) -> Result<CudaTensor, CommError> {
        const OP: &str = "all_gather";
        let peers = self.publish(OP, dev, rank, t)?;
        let flat = concat_flat(dev, &peers).map_err(|e| device_failure(OP, e))?;
        drop(peers);
        self.finish(OP, dev, rank)?;
        kernels::interleave(dev, &flat, &t.shape, dim, self.size).map_err(|e| device_failure(OP, e))
    }

    fn reduce_scatter(
        &self,
        dev: &RankDevice,
        rank: usize,
        t: &CudaTensor,
        dim: usize,
    ) -> Result<CudaTensor, CommError> {
        const OP: &str = "reduce_scatter";
        // Every member takes the part `rank` along `dim` of each peer's tensor and sums them.
        let peers = self.publish(OP, dev, rank, t)?;
        let mut parts = Vec::with_capacity(self.size);
        for p in &peers {
            parts.push(
                kernels::local_slice(dev, p, dim, rank, self.size)
                    .map_err(|e| device_failure(OP, e))?,
            );
        }
        drop(peers);
        self.finish(OP, dev, rank)?;
        let mut out =
            kernels::zeros(dev, &parts[0].shape, t.dtype()).map_err(|e| device_failure(OP, e))?;
        kernels::reduce_buffers(
            dev,
            &mut out,
            &parts.iter().collect::<Vec<_>>(),
            ReduceOp::Sum,
        )
        .map_err(|e| device_failure(OP, e))?;
        Ok(out)
    }
}

/// `parts` (all of one shape and type) one after another in a new tensor of shape
/// `[parts.len(), ..shape]`, copied on `dev`'s stream.
fn concat_flat(dev: &RankDevice, parts: &[CudaTensor]) -> Result<CudaTensor, KernelError> {
    let n = parts[0].numel();
    let mut shape = parts[0].shape.clone();
    shape.insert(0, parts.len());
    let mut out = kernels::zeros(dev, &shape, parts[0].dtype())?;
    if n == 0 {
        // An empty tensor's buffer holds one placeholder element: nothing to copy.
        return Ok(out);
    }
    let failed = |e: cudarc::driver::DriverError| KernelError::Device {
        op: "all_gather",
        msg: e.to_string(),
    };
    for (i, part) in parts.iter().enumerate() {
        match (&part.data, &mut out.data) {
            (DeviceData::F32(src), DeviceData::F32(dst)) => {
                let dst = Arc::get_mut(dst).ok_or_else(|| device_buffer_shared("all_gather"))?;
                dev.stream
                    .memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(i * n..(i + 1) * n))
                    .map_err(failed)?;
            }
            (DeviceData::Bf16(src), DeviceData::Bf16(dst)) => {
                let dst = Arc::get_mut(dst).ok_or_else(|| device_buffer_shared("all_gather"))?;
                dev.stream
                    .memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(i * n..(i + 1) * n))
                    .map_err(failed)?;
            }
            _ => {
                return Err(KernelError::Device {
                    op: "all_gather",
                    msg: "members hold different dtypes".into(),
                })
            }
        }
    }
    Ok(out)
}

fn device_buffer_shared(op: &'static str) -> KernelError {
    KernelError::Device {
        op,
        msg: "a fresh buffer is shared".into(),
    }
}

/// Records an event on `dev`'s stream.
fn record(dev: &RankDevice) -> Result<Arc<CudaEvent>, cudarc::driver::DriverError> {
    let e = dev.gpu.ctx.new_event(None)?;
    e.record(&dev.stream)?;
    Ok(Arc::new(e))
}

/// One member of an NCCL communicator: this rank's side only (each rank builds its own from the
/// group's shared unique id).
pub struct NcclGroup {
    size: usize,
    comm: Mutex<SendComm>,
    /// This member's registration with the process's watchdog, when the job has one.
    watch: Option<Arc<Watch>>,
}

/// An NCCL communicator that may move between threads.
struct SendComm(NcclComm);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (NCCL's thread
// safety rules: not concurrently); the group's mutex serializes every call.
unsafe impl Send for SendComm {}

impl NcclGroup {
    /// Wraps this rank's communicator; with `watch`, every collective is reported to its
    /// watchdog.
    pub fn new(comm: NcclComm, watch: Option<Arc<Watch>>) -> NcclGroup {
        NcclGroup {
            size: comm.world_size(),
            comm: Mutex::new(SendComm(comm)),
            watch,
        }
    }

    fn comm(&self) -> MutexGuard<'_, SendComm> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one NCCL call, registered with the watchdog from before the call until the event
    /// recorded after it on the collective stream completes.
    fn call(
        &self,
        op: &'static str,
        f: impl FnOnce(&NcclComm) -> Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<(), CommError> {
        let comm = self.comm();
        let seq = self.watch.as_ref().map(|w| w.begin(op));
        let r = f(&comm.0);
        if let (Some(w), Some(seq)) = (&self.watch, seq) {
            match (&r, comm.0.stream().record_event(None)) {
                (Ok(()), Ok(event)) => w.queued(seq, event),
                _ => w.cancel(seq),
            }
        }
        r.map_err(|e| device_failure(op, format!("{e:?}")))
    }

    fn nccl_op(op: ReduceOp) -> NcclOp {
        match op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Max => NcclOp::Max,
        }
    }

    fn all_reduce(
        &self,
        dev: &RankDevice,
        t: &mut CudaTensor,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        const OP: &str = "all_reduce";
        if t.numel() == 0 {
            // Nothing to reduce (every member holds the same empty shape, so all skip alike).
            return Ok(());
        }
        t.make_unique(&dev.stream)
            .map_err(|e| device_failure(OP, e))?;
        let nccl_op = Self::nccl_op(op);
        match &mut t.data {
            DeviceData::F32(b) => {
                let b = Arc::get_mut(b).ok_or_else(|| device_failure(OP, "buffer shared"))?;
                self.call(OP, |c| {
                    c.all_reduce_in_place(&mut **b, &nccl_op).map(|_| ())
                })
            }
            DeviceData::Bf16(b) => {
                let b = Arc::get_mut(b).ok_or_else(|| device_failure(OP, "buffer shared"))?;
                self.call(OP, |c| {
                    c.all_reduce_in_place(&mut **b, &nccl_op).map(|_| ())
                })
            }
        }
    }

    fn all_gather(
        &self,
        dev: &RankDevice,
        t: &CudaTensor,
        dim: usize,
    ) -> Result<CudaTensor, CommError> {
        const OP: &str = "all_gather";
        let mut flat_shape = t.shape.clone();
        flat_shape.insert(0, self.size);
        let mut flat =
            kernels::zeros(dev, &flat_shape, t.dtype()).map_err(|e| device_failure(OP, e))?;
        // NCCL sends the whole send buffer: an empty tensor's one placeholder element would be
        // gathered `size` times into the receive buffer's single element (a write past its
        // end), so an empty tensor skips NCCL (every member holds the same empty shape).
        if t.numel() > 0 {
            match (&t.data, &mut flat.data) {
                (DeviceData::F32(x), DeviceData::F32(out)) => {
                    let out =
                        Arc::get_mut(out).ok_or_else(|| device_failure(OP, "buffer shared"))?;
                    self.call(OP, |c| c.all_gather(&***x, &mut **out).map(|_| ()))?;
                }
                (DeviceData::Bf16(x), DeviceData::Bf16(out)) => {
                    let out =
                        Arc::get_mut(out).ok_or_else(|| device_failure(OP, "buffer shared"))?;
                    self.call(OP, |c| c.all_gather(&***x, &mut **out).map(|_| ()))?;
                }
                _ => return Err(device_failure(OP, "dtypes differ")),
            }
        }
        kernels::interleave(dev, &flat, &t.shape, dim, self.size).map_err(|e| device_failure(OP, e))
    }

    fn reduce_scatter(
        &self,
        dev: &RankDevice,
        t: &CudaTensor,
        dim: usize,
    ) -> Result<CudaTensor, CommError> {
        const OP: &str = "reduce_scatter";
        let chunks =
            kernels::deinterleave(dev, t, dim, self.size).map_err(|e| device_failure(OP, e))?;
        let mut shape = t.shape.clone();
        shape[dim] /= self.size;
        let mut out = kernels::zeros(dev, &shape, t.dtype()).map_err(|e| device_failure(OP, e))?;
        // NCCL reads `size` × the receive buffer's length: an empty result's one placeholder
        // element would make it read past the empty input's single element, so an empty tensor
        // skips NCCL (every member holds the same empty shape).
        if out.numel() == 0 {
            return Ok(out);
        }
        match (&chunks.data, &mut out.data) {
            (DeviceData::F32(x), DeviceData::F32(o)) => {
                let o = Arc::get_mut(o).ok_or_else(|| device_failure(OP, "buffer shared"))?;
                self.call(OP, |c| {
                    c.reduce_scatter(&***x, &mut **o, &NcclOp::Sum).map(|_| ())
                })?;
            }
            (DeviceData::Bf16(x), DeviceData::Bf16(o)) => {
                let o = Arc::get_mut(o).ok_or_else(|| device_failure(OP, "buffer shared"))?;
                self.call(OP, |c| {
                    c.reduce_scatter(&***x, &mut **o, &NcclOp::Sum).map(|_| ())
                })?;
            }
            _ => return Err(device_failure(OP, "dtypes differ")),
        }
        Ok(out)
    }

    fn all_reduce_host(
        &self,
        dev: &RankDevice,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        const OP: &str = "all_reduce (host)";
        if buf.is_empty() {
            // CUDA cannot allocate 0 bytes; there is nothing to reduce (every member holds as
            // many statistics, so all skip alike).
            return Ok(());
        }
        let mut d = dev
            .stream
            .clone_htod(buf)
            .map_err(|e| device_failure(OP, e))?;
        let nccl_op = Self::nccl_op(op);
        self.call(OP, |c| c.all_reduce_in_place(&mut d, &nccl_op).map(|_| ()))?;
        dev.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| device_failure(OP, e))?;
        dev.stream.synchronize().map_err(|e| device_failure(OP, e))
    }
}

/// A rank's membership of a CUDA group: the group, its index there, and its device (the
/// stream its collectives are queued on).
pub struct CudaComm {
    group: Arc<CudaGroup>,
    index: usize,
    device: RankDevice,
}

impl CudaComm {
    /// Member `index` of `group`, computing on `device`.
    pub fn new(group: Arc<CudaGroup>, index: usize, device: RankDevice) -> CudaComm {
        CudaComm {
            group,
            index,
            device,
        }
    }
}

impl Comm<Cuda> for CudaComm {
    /// Virtual ranks: the members share one GPU, each on its own stream.
    fn in_process(members: &[Cuda], timeout: Duration) -> Vec<CudaComm> {
        let group = Arc::new(CudaGroup::Virtual(VirtualGroup::new(
            members.len(),
            timeout,
        )));
        members
            .iter()
            .enumerate()
            .map(|(index, be)| CudaComm::new(group.clone(), index, be.device().clone()))
            .collect()
    }

    fn size(&self) -> usize {
        self.group.size()
    }

    fn index(&self) -> usize {
        self.index
    }

    fn all_reduce(&self, t: &mut CudaTensor, op: ReduceOp) -> Result<(), CommError> {
        let (dev, rank) = (&self.device, self.index);
        match &*self.group {
            CudaGroup::Virtual(g) => g.all_reduce(dev, rank, t, op),
            CudaGroup::Nccl(g) => g.all_reduce(dev, t, op),
        }
    }

    fn all_reduce_host(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        match &*self.group {
            CudaGroup::Virtual(g) => g.host.all_reduce(self.index, buf, op),
            CudaGroup::Nccl(g) => g.all_reduce_host(&self.device, buf, op),
        }
    }

    fn all_gather(&self, t: &CudaTensor, dim: usize) -> Result<CudaTensor, CommError> {
        let (dev, rank) = (&self.device, self.index);
        match &*self.group {
            CudaGroup::Virtual(g) => g.all_gather(dev, rank, t, dim),
            CudaGroup::Nccl(g) => g.all_gather(dev, t, dim),
        }
    }

    fn reduce_scatter(&self, t: &CudaTensor, dim: usize) -> Result<CudaTensor, CommError> {
        let (dev, rank) = (&self.device, self.index);
        match &*self.group {
            CudaGroup::Virtual(g) => g.reduce_scatter(dev, rank, t, dim),
            CudaGroup::Nccl(g) => g.reduce_scatter(dev, t, dim),
        }
    }

    fn abort(&self, why: &str) {
        match &*self.group {
            CudaGroup::Virtual(g) => {
                g.exchange.abort(self.index, why);
                g.host.abort(self.index, why);
            }
            // NCCL has no cross-process abort notice here: the launcher stops the other ranks
            // when this process exits with the error.
            CudaGroup::Nccl(_) => {}
        }
    }

    fn note(&self, node: &str) {
        if let CudaGroup::Nccl(NcclGroup { watch: Some(w), .. }) = &*self.group {
            w.note(node);
        }
    }
}
