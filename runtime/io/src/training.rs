//! A trainer's checkpoints: saving and resuming, written once for every rank however it runs
//! (a thread of this process or a process of its own).
//!
//! ```text
//! save:   every rank ─► Trainer::gather_state (shards to tp rank 0 over its group)
//!           ─► rank (tp 0, dp 0) writes checkpoint::save (weights, AdamW's m and v, the step)
//! resume: every rank ─► checkpoint::load (full tensors, written at any tp)
//!           ─► Trainer::new (its weight shards) + Trainer::restore (its moment shards, the step)
//! ```

use crate::checkpoint::{self, CheckpointError, CheckpointMeta};
use ferrotron_exec::{Backend, ExecError, Rank, RunOptions, Tensor, TrainConfig, Trainer};
use ferrotron_partitioner::Plan;
use std::collections::HashMap;
use std::path::Path;

/// Saving or resuming failed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Gathering or sharding the state failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The checkpoint is of another model, or lacks the optimizer state.
    #[error("{0}")]
    Mismatch(String),
}

/// Writes the job's checkpoint to `dir` (sharded safetensors and metadata, atomically): the
/// weights, the AdamW moments and the step, with the data position and whatever `extra`
/// describes the run. Every rank of the job calls it; the rank at tp 0, dp 0 writes.
pub fn save<B: Backend>(
    trainer: &Trainer<B>,
    dir: &Path,
    seed: u64,
    data_position: u64,
    extra: serde_json::Value,
) -> Result<(), ResumeError> {
    let Some([params, m, v]) = trainer.gather_state()? else {
        return Ok(());
    };
    let meta = CheckpointMeta {
        model: trainer.plan.model.clone(),
        step: trainer.step,
        seed,
        data_position,
        extra,
        ..CheckpointMeta::default()
    };
    checkpoint::save(
        dir,
        trainer.plan,
        &meta,
        &[("params", &params), ("adam_m", &m), ("adam_v", &v)],
    )?;
    Ok(())
}

/// `rank`'s trainer continuing from a checkpoint written by [`save`] (at any tp: the full
/// tensors are re-sharded for `plan`), and the checkpoint's metadata.
pub fn resume<'p, B: Backend>(
    rank: Rank<B>,
    plan: &'p Plan,
    dir: &Path,
    config: TrainConfig,
    run: RunOptions,
) -> Result<(Trainer<'p, B>, CheckpointMeta), ResumeError> {
    let (meta, [params, m, v]) = load_state(plan, dir)?;
    let mut trainer = Trainer::new(rank, plan, config, &params, run)?;
    trainer.restore(&m, &v, meta.step)?;
    Ok((trainer, meta))
}

/// A checkpoint's metadata and its weights and AdamW moments (full tensors), checked to be of
/// `plan`'s model.
fn load_state(
    plan: &Plan,
    dir: &Path,
) -> Result<(CheckpointMeta, [HashMap<String, Tensor>; 3]), ResumeError> {
    let (meta, mut groups) = checkpoint::load(dir)?;
    if meta.model != plan.model {
        return Err(ResumeError::Mismatch(format!(
            "{}: a checkpoint of `{}`, not of `{}`",
            dir.display(),
            meta.model,
            plan.model
        )));
    }
    let mut take = |g: &str| {
        groups.remove(g).ok_or_else(|| {
            ResumeError::Mismatch(format!("{}: no `{g}` in the checkpoint", dir.display()))
        })
    };
    Ok((meta, [take("params")?, take("adam_m")?, take("adam_v")?]))
}
