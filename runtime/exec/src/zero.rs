//! The distributed optimizer (ZeRO stage 1, Megatron's `--use-distributed-optimizer`): each
//! data-parallel rank keeps the Adam moments of only its share of every parameter's local
//! shard, so the optimizer state per rank falls to 1/dp.
//!
//! ```text
//! gradient (a partial sum over dp) ─► flatten, zero-pad to dp equal shares ─► reduce-scatter
//!   over dp ─► this rank's share of the summed gradient ─► norm, clip, AdamW on the share of the
//!   weights ─► all-gather over dp ─► the whole updated shard on every dp rank
//! ```
//!
//! The plan ([`ferrotron_partitioner::Plan::distributed_optimizer`]) leaves the data-parallel
//! sum out of the backward pass; the shares' geometry is
//! [`ferrotron_partitioner::Plan::optimizer_share`]. The weights the step computes with stay
//! whole on every rank (stage 1 shards neither them nor the gradients), and AdamW is elementwise,
//! so a share's update is exactly the replicated optimizer's on those elements.

use crate::backend::Backend;
use crate::comm::Comm;
use crate::error::ExecError;
use crate::kernel::{KernelError, Placement};
use crate::rank::Rank;
use crate::Tensor;
use ferrotron_ir::{Dim, Op, ParamId};
use ferrotron_partitioner::{Layout, Plan};

/// `t` flattened and zero-padded (or cut) to `len` elements: a 1-D tensor.
pub fn flat<B: Backend>(be: &B, t: &B::Tensor, len: usize) -> Result<B::Tensor, KernelError> {
    let n: usize = be.shape(t).iter().product();
    let flat = be.reshape(t.clone(), vec![n]);
    let op = match len.cmp(&n) {
        std::cmp::Ordering::Equal => return Ok(flat),
        std::cmp::Ordering::Greater => Op::Pad {
            x: &flat,
            dim: 0,
            before: Dim::new(0),
            after: Dim::new((len - n) as u64),
        },
        std::cmp::Ordering::Less => Op::Slice {
            x: &flat,
            dim: 0,
            start: Dim::new(0),
            end: Dim::new(len as u64),
        },
    };
    let mut out = be.eval(&op, &Placement::default())?;
    Ok(out.remove(0))
}

/// This rank's share of parameter `p`'s tensor `t` (laid out like the parameter's local shard):
/// summed over the data-parallel group first when `t` is a partial sum there (a gradient), taken
/// as it is when every dp rank holds the same (the weights, a gradient the batch does not
/// reach).
pub fn share<B: Backend>(
    rank: &Rank<B>,
    plan: &Plan,
    p: ParamId,
    t: &B::Tensor,
    dp_layout: Layout,
) -> Result<B::Tensor, ExecError> {
    let be = &rank.backend;
    let dp = plan.mesh.dp as usize;
    let (_, len) = plan.optimizer_share(p, rank.coord.dp);
    let padded = flat(be, t, len * dp).map_err(|e| failed(plan, p, e))?;
    if dp_layout == Layout::Partial {
        rank.groups
            .dp
            .reduce_scatter(&padded, 0)
            .map_err(|error| comm(rank, plan, p, error))
    } else {
        be.local_slice(&padded, 0, rank.coord.dp, dp)
            .map_err(|e| failed(plan, p, e))
    }
}

/// The whole local shard of parameter `p` (shaped `shape`) from every dp rank's `share`: an
/// all-gather over the data-parallel group, the padding cut off.
pub fn unshare<B: Backend>(
    rank: &Rank<B>,
    plan: &Plan,
    p: ParamId,
    share: &B::Tensor,
    shape: &[usize],
) -> Result<B::Tensor, ExecError> {
    let be = &rank.backend;
    let all = rank
        .groups
        .dp
        .all_gather(share, 0)
        .map_err(|error| comm(rank, plan, p, error))?;
    let n = shape.iter().product();
    let whole = flat(be, &all, n).map_err(|e| failed(plan, p, e))?;
    Ok(be.reshape(whole, shape.to_vec()))
}

/// Data-parallel rank `dp`'s share of parameter `p`'s host tensor `t` (laid out like the
/// parameter's local shard), the padding zero: how a checkpoint's moments are restored.
pub fn host_share(plan: &Plan, p: ParamId, dp: usize, t: &Tensor) -> Tensor {
    let (range, len) = plan.optimizer_share(p, dp);
    let mut data = t.data.get(range).unwrap_or_default().to_vec();
    data.resize(len, 0.0);
    Tensor {
        shape: vec![len],
        data: data.into(),
    }
}

fn failed(plan: &Plan, p: ParamId, e: KernelError) -> ExecError {
    ExecError::Plan(format!(
        "the distributed optimizer's share of `{}`: {e}",
        plan.graph.params[p].name
    ))
}

fn comm<B: Backend>(rank: &Rank<B>, plan: &Plan, p: ParamId, error: crate::CommError) -> ExecError {
    ExecError::Comm {
        at: rank.coord,
        node: format!(
            "the distributed optimizer's share of `{}`",
            plan.graph.params[p].name
        ),
        group: None,
        error,
    }
}
