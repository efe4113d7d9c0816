//! Which ranks of a job this process runs, and on which backend: every rank as a thread (the
//! in-process launcher of `ferrotron-exec`), or, under `ferrotron launch` (or `srun`,
//! `torchrun`, `mpirun`: `ferrotron_launch::cluster`), the one rank the launcher gave it, its
//! groups formed through the job's store (TCP between CPU ranks, NCCL between GPUs) and, with
//! pipeline stages, its link to the other stages (TCP, through host copies on a GPU). Either way
//! the subcommand then runs the same rank program on them.

use crate::args::{BackendArgs, BackendKind, Precision};
use anyhow::{bail, Context, Result};
use ferrotron_cpu::{Cpu, CpuComm};
use ferrotron_exec::{launch, Backend, Groups, Rank};
use ferrotron_ir::MeshAxis;
use ferrotron_launch::{RankEnv, Store, TcpGroup, TcpLink, WorkerEnv};
use ferrotron_partitioner::{Coord, Mesh};
use std::sync::Arc;
use std::time::Duration;

/// This process's part of a job.
pub enum Job {
    /// Every rank, as threads of this process.
    Threads,
    /// One rank, under `ferrotron launch` or another launcher (`srun`, `torchrun`, `mpirun`).
    Worker(RankEnv),
}

impl Job {
    /// The launcher's worker, if a launcher started this process (its variables say so); else
    /// every rank here.
    pub fn from_env() -> Result<Job> {
        Ok(match RankEnv::from_env()? {
            Some(w) => Job::Worker(w),
            None => Job::Threads,
        })
    }

    /// Whether this process runs every rank of the job.
    pub fn is_whole(&self) -> bool {
        matches!(self, Job::Threads)
    }
}

/// What a subcommand does with this process's ranks, whatever their backend (a generic
/// function over backends cannot be a closure).
pub trait OnRanks: Send {
    /// Runs with the ranks, in rank order.
    fn on<B: Backend>(self, ranks: Vec<Rank<B>>) -> Result<()>;
}

/// Calls `work` with this process's ranks of `mesh` on the backend `args` asks for; `timeout`
/// bounds every wait of in-process groups (a worker's groups take the launcher's).
///
/// A worker meets the job's store first (under another launcher than ferrotron's, rank 0 hosts
/// it), and leaves it after `work`, saying why if it failed on its own account (not because a
/// peer did), so that the other ranks stop at once.
pub fn with_ranks(
    job: &Job,
    args: &BackendArgs,
    mesh: Mesh,
    timeout: Duration,
    work: impl OnRanks,
) -> Result<()> {
    let Job::Worker(env) = job else {
        return on_ranks(None, args, mesh, timeout, work);
    };
    let w = &env.worker;
    if w.world_size != mesh.ranks() {
        bail!(
            "{} started {} ranks, the plan needs tp × dp × pp = {} × {} × {} = {}",
            env.convention.launcher(),
            w.world_size,
            mesh.tp,
            mesh.dp,
            mesh.pp,
            mesh.ranks()
        );
    }
    let joined = env.join().context("meeting the job's other ranks")?;
    let member = Member {
        env: w,
        store: joined.store(),
    };
    let result = on_ranks(Some(member), args, mesh, timeout, work);
    let failure = match &result {
        Err(e) if !crate::stopped_by_peer(e) => Some(format!("rank {} failed: {e:#}", w.rank)),
        _ => None,
    };
    let left = joined.leave(failure);
    result?;
    left.context("leaving the job's store")
}

/// This process's one rank of a job of processes, and the job's store.
#[derive(Clone, Copy)]
struct Member<'a> {
    env: &'a WorkerEnv,
    store: &'a Store,
}

/// [`with_ranks`], once a worker has met the store.
fn on_ranks(
    member: Option<Member>,
    args: &BackendArgs,
    mesh: Mesh,
    timeout: Duration,
    work: impl OnRanks,
) -> Result<()> {
    match args.backend {
        BackendKind::Cpu => {
            // Ranks as threads share this machine's cores; launched workers share them with the
            // other workers of their node.
            let sharing = match member {
                None => mesh.ranks(),
                Some(m) => m.env.local_world_size,
            };
            let cpu = Cpu::with_threads(args.threads_per_rank(sharing));
            let ranks = match member {
                None => launch::ranks(&cpu, mesh, timeout),
                Some(m) => vec![cpu_rank(m, mesh, cpu)?],
            };
            if ranks.len() > 1 {
                return work.on(ranks);
            }
            // A process's only rank runs on a thread of the pool its kernels split their work
            // over, so it takes part in that work itself instead of sleeping until it is done
            // and being woken after every op (half the system time of a step).
            rayon::scope(|_| work.on(ranks))
        }
        BackendKind::Cuda => cuda::with_ranks(member, args, mesh, timeout, work),
    }
}

/// This worker's rank on the CPU backend: its groups are TCP groups met through the store, and
/// its link to the other stages (with a pipeline) a TCP link.
fn cpu_rank(m: Member, mesh: Mesh, cpu: Cpu) -> Result<Rank<Cpu>> {
    let (w, store) = (m.env, m.store);
    let coord = mesh.coord(w.rank);
    let group = |axis: MeshAxis| -> Result<CpuComm> {
        let name = mesh.group_name(axis, coord);
        let size = mesh.size(axis) as usize;
        let tcp = TcpGroup::connect(store, &name, coord.on(axis), size, w.timeout)?;
        Ok(CpuComm::new(Arc::new(tcp), coord.on(axis)))
    };
    let groups = Groups {
        tp: group(MeshAxis::Tp)?,
        dp: group(MeshAxis::Dp)?,
    };
    let rank = Rank::new(mesh, coord, cpu, groups)?;
    Ok(match stage_link(store, w, mesh, coord)? {
        Some(link) => rank.with_link(Arc::new(link)),
        None => rank,
    })
}

/// With pipeline stages, this worker's link to the ranks of the other stages at its tensor- and
/// data-parallel place (the ones it sends to and receives from), met through the store.
fn stage_link(store: &Store, w: &WorkerEnv, mesh: Mesh, coord: Coord) -> Result<Option<TcpLink>> {
    if mesh.pp <= 1 {
        return Ok(None);
    }
    let members: Vec<usize> = (0..mesh.pp as usize).map(|s| mesh.peer(coord, s)).collect();
    let name = format!("pp/tp{}/dp{}", coord.tp, coord.dp);
    let link = TcpLink::connect(store, &name, &members, w.rank, w.timeout)
        .context("joining the other pipeline stages")?;
    Ok(Some(link))
}

/// The CUDA backend's ranks: virtual ranks on one GPU, or one GPU per worker with NCCL.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{stage_link, Member, OnRanks};
    use crate::args::{BackendArgs, Precision};
    use anyhow::Result;
    use ferrotron_cuda::{Cuda, CudaComm, Hang, Storage, Watchdog};
    use ferrotron_exec::{launch, Backend, CommError, ExecError, Groups, Link, Rank, Tag};
    use ferrotron_ir::{DType, MeshAxis};
    use ferrotron_launch::{Failure, TcpLink};
    use ferrotron_partitioner::Mesh;
    use std::sync::Arc;
    use std::time::Duration;

    pub fn with_ranks(
        member: Option<Member>,
        args: &BackendArgs,
        mesh: Mesh,
        timeout: Duration,
        work: impl OnRanks,
    ) -> Result<()> {
        let storage = match args.dtype {
            Precision::F32 => Storage::F32,
            Precision::Bf16 => Storage::Bf16,
        };
        let ranks = match member {
            None => {
                let cuda = Cuda::new(args.device.unwrap_or(0), mesh.ranks(), storage)?;
                launch::ranks(&cuda, mesh, timeout)
            }
            Some(m) => {
                let device = args
                    .device
                    .unwrap_or_else(|| worker_device(m.env.local_rank));
                let cuda = Cuda::new(device, 1, storage)?;
                let watchdog = watchdog(m, mesh, &cuda)?;
                let ranks = vec![nccl_rank(m, mesh, cuda, &watchdog)?];
                return work.on(ranks);
            }
        };
        work.on(ranks)
    }

    /// The watchdog of this worker's NCCL groups (their collectives run on the device, where
    /// nothing on the host bounds a wait): a collective that has not completed within the job's
    /// timeout is recorded as the job's failure, naming the node, the group and the ranks that
    /// had not arrived, and this process exits, so the launcher stops the job.
    fn watchdog(m: Member, mesh: Mesh, cuda: &Cuda) -> Result<Watchdog> {
        let (w, coord) = (m.env, mesh.coord(m.env.rank));
        // Its own connection: the watchdog's thread must not wait behind the rank's requests.
        let store = Arc::new(m.store.reconnect()?);
        let rank = w.rank;
        let groups: Vec<(String, MeshAxis, Vec<usize>)> = [MeshAxis::Tp, MeshAxis::Dp]
            .into_iter()
            .map(|a| (mesh.group_name(a, coord), a, mesh.group(a, coord)))
            .collect();
        let reporter = store.clone();
        Ok(cuda.watchdog(w.timeout, store, move |hang: Hang| {
            let group =
                groups
                    .iter()
                    .find(|(name, ..)| *name == hang.group)
                    .map(|(_, axis, ranks)| {
                        Box::new(ferrotron_exec::GroupRanks {
                            axis: *axis,
                            ranks: ranks.clone(),
                        })
                    });
            let error = ExecError::Comm {
                at: coord,
                node: hang.node,
                group,
                error: CommError::Timeout {
                    op: hang.op,
                    waited: hang.waited,
                    missing: hang.missing,
                },
            };
            let why = format!(
                "rank {rank} failed: {error} (NCCL watchdog: collective {} of the group)",
                hang.seq
            );
            let _ = reporter.fail(&Failure {
                rank: Some(rank),
                why: why.clone(),
            });
            eprintln!("error: {why}");
            std::process::exit(1);
        }))
    }

    /// A worker's GPU: its local rank, unless the launcher lets each task see a single GPU
    /// (Slurm's `--gpus-per-task=1` or `--gpu-bind`), which is then device 0.
    fn worker_device(local_rank: usize) -> usize {
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if !v.trim().is_empty() && !v.contains(',') => 0,
            _ => local_rank,
        }
    }

    /// This worker's rank with NCCL groups, each group's unique id made by its member 0 and
    /// shared through the launcher's store; with pipeline stages, linked to the other stages by
    /// a TCP link through host copies.
    fn nccl_rank(m: Member, mesh: Mesh, cuda: Cuda, watchdog: &Watchdog) -> Result<Rank<Cuda>> {
        let (w, store) = (m.env, m.store);
        let coord = mesh.coord(w.rank);
        let group = |axis: MeshAxis| -> Result<CudaComm> {
            let name = mesh.group_name(axis, coord);
            let key = format!("nccl/{name}");
            let member = coord.on(axis);
            let id = match member {
                0 => Some(Cuda::new_nccl_id()?),
                _ => None,
            };
            let id = store.broadcast(&key, id.as_ref().map(|i| &i[..]), w.timeout)?;
            let size = mesh.size(axis) as usize;
            Ok(cuda.nccl_group(&id, member, size, Some((watchdog, &name)))?)
        };
        let groups = Groups {
            tp: group(MeshAxis::Tp)?,
            dp: group(MeshAxis::Dp)?,
        };
        let link = stage_link(store, w, mesh, coord)?;
        let rank = Rank::new(mesh, coord, cuda.clone(), groups)?;
        Ok(match link {
            Some(link) => rank.with_link(Arc::new(HostLink {
                backend: cuda,
                link,
            })),
            None => rank,
        })
    }

    /// A [`TcpLink`] for device tensors: a send copies the tensor to the host, a receive copies
    /// it to the device, held as its sender held it (`f32`, or the backend's compute type).
    struct HostLink<B> {
        backend: B,
        link: TcpLink,
    }

    impl<B: Backend> HostLink<B> {
        fn device_error(rank: usize, what: &str, e: impl std::fmt::Display) -> CommError {
            CommError::PeerFailed {
                rank,
                why: format!("copying a pipeline transfer {what}: {e}"),
            }
        }
    }

    impl<B: Backend> Link<B::Tensor> for HostLink<B> {
        fn send(&self, from: usize, to: usize, tag: Tag, t: B::Tensor) -> Result<(), CommError> {
            let be = &self.backend;
            let numel: usize = be.shape(&t).iter().product();
            let kept_f32 = be.bytes(&t) >= 4 * numel;
            let host = be
                .download(&t)
                .map_err(|e| Self::device_error(from, "to the host", e))?;
            self.link.send_host(from, to, tag, host, kept_f32)
        }

        fn recv(&self, from: usize, to: usize, tag: Tag) -> Result<B::Tensor, CommError> {
            let (host, kept_f32) = self.link.recv_host(from, to, tag)?;
            // Backends keep integer-typed values exact, in `f32`: what the sender held in `f32`
            // (ids, statistics, the stages' host sums) stays so.
            let dtype = if kept_f32 { DType::I32 } else { DType::F32 };
            self.backend
                .upload(&host, dtype)
                .map_err(|e| Self::device_error(to, "to the device", e))
        }

        fn abort(&self, rank: usize, why: &str) {
            self.link.abort(rank, why);
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::{Member, OnRanks};
    use crate::args::BackendArgs;
    use anyhow::{bail, Result};
    use ferrotron_partitioner::Mesh;
    use std::time::Duration;

    pub fn with_ranks(
        _: Option<Member>,
        _: &BackendArgs,
        _: Mesh,
        _: Duration,
        _: impl OnRanks,
    ) -> Result<()> {
        bail!(
            "this ferrotron was built without the CUDA backend: build it with the cargo feature \
             `cuda` (on by default)"
        )
    }
}

/// The precision a step's verification is held to.
pub fn tolerances(args: &BackendArgs) -> ferrotron_exec::verify::Tolerances {
    match (args.backend, args.dtype) {
        (BackendKind::Cuda, Precision::Bf16) => ferrotron_exec::verify::Tolerances::BF16,
        _ => ferrotron_exec::verify::Tolerances::F32,
    }
}
