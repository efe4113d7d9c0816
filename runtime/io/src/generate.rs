//! Text generation from a checkpoint: the model's forward pass, run on the plan's ranks, one
//! token at a time (greedy, or sampled with a temperature).
//!
//! The graph has a fixed `[batch, seq]` token input, so the context is the last `seq` tokens,
//! padded at the end; a causal model's logits at position `t` do not depend on what comes after
//! `t`, so the padding never changes the prediction that is read.

use crate::checkpoint::{self, CheckpointError};
use crate::tokenizer::{Tokenizer, TokenizerError};
use ferrotron_exec::Tensor;
use ferrotron_exec::{run_sharded, shard_params, upload_params, Backend, ExecError, RunOptions};
use ferrotron_ir::reference::splitmix64;
use ferrotron_ir::Graph;
use ferrotron_partitioner::Plan;
use std::collections::HashMap;
use std::path::Path;
use thiserror::Error;

/// Why generation failed.
#[derive(Debug, Error)]
pub enum GenerateError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A run failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The prompt could not be encoded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The model cannot generate (no logits output, no token input) or the checkpoint lacks
    /// weights.
    #[error("{0}")]
    Model(String),
}

/// How the next tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Tokens to add.
    pub tokens: usize,
    /// 0: the most likely token (greedy); above: sampled from the softmax of logits / this.
    pub temperature: f64,
    /// The sampler's seed.
    pub seed: u64,
}

/// Continues `prompt` with the weights in checkpoint `dir`, running `plan`'s forward pass on
/// `backend` with every rank in this process. The plan must hold no dropout (partition
/// [`ferrotron_ir::dropout::with_dropout`]`(g, 0.0)`): generation is evaluation.
pub fn generate<B: Backend>(
    backend: B,
    (g, plan): (&Graph, &Plan),
    dir: &Path,
    tokenizer: &Tokenizer,
    prompt: &str,
    sampling: Sampling,
) -> Result<String, GenerateError> {
    let Sampling {
        tokens: count,
        temperature,
        seed,
    } = sampling;
    if let Some(n) = plan
        .graph
        .nodes
        .values()
        .find(|n| matches!(n.op, ferrotron_ir::Op::Dropout { p, .. } if p > 0.0))
    {
        return Err(GenerateError::Model(format!(
            "`{}` drops activations: generate from a model without dropout \
             (ferrotron_ir::dropout::with_dropout(graph, 0.0) before partitioning)",
            n.name
        )));
    }
    let (_, mut groups) = checkpoint::load(dir)?;
    let params = groups
        .remove("params")
        .ok_or_else(|| GenerateError::Model(format!("{}: no weights", dir.display())))?;
    let shards = upload_params(&backend, plan, &shard_params(plan, &params)?)?;
    let input = g
        .inputs
        .iter()
        .copied()
        .find(|&v| g.ty(v).dtype.is_int() && g.ty(v).shape.rank() == 2)
        .ok_or_else(|| GenerateError::Model("the model has no [batch, seq] token input".into()))?;
    if g.output("logits").is_none() {
        return Err(GenerateError::Model(
            "the model has no `logits` output".into(),
        ));
    }
    let sizes = g.ty(input).shape.sizes();
    let seq = sizes[1] as usize;
    let vocab = plan.vocab_padding.map_or_else(
        || {
            let l = g.ty(g.output("logits").expect("checked")).shape.sizes();
            *l.last().unwrap_or(&1)
        },
        |(v, _)| v,
    ) as usize;
    let mut tokens = tokenizer.encode(prompt)?;
    if tokens.is_empty() {
        // An empty prompt starts from a line break, in the tokenizer's own ids.
        tokens = tokenizer.encode("\n")?;
    }
    if tokens.is_empty() {
        return Err(GenerateError::Model(format!(
            "the {} tokenizer gives no token for an empty prompt (nor a line break)",
            tokenizer.name()
        )));
    }
    let opts = RunOptions {
        forward_only: true,
        ..RunOptions::default()
    };
    let mut state = seed ^ 0x5eed;
    for _ in 0..count {
        let context = &tokens[tokens.len().saturating_sub(seq)..];
        let mut feed: HashMap<String, Tensor> = g
            .inputs
            .iter()
            .map(|&v| {
                let shape: Vec<usize> = g.ty(v).shape.sizes().iter().map(|&s| s as usize).collect();
                (g.values[v].name.clone(), Tensor::zeros(shape))
            })
            .collect();
        let ids = feed
            .get_mut(&g.values[input].name)
            .expect("the token input");
        for (i, &t) in context.iter().enumerate() {
            ids.data[i] = t as f32;
        }
        let run = run_sharded(backend.clone(), plan, &shards, &feed, &opts)?;
        let logits = run.output("logits")?;
        let width = *logits.shape.last().unwrap_or(&1);
        let at = context.len() - 1;
        let row = &logits.data[at * width..at * width + vocab.min(width)];
        let next = if temperature <= 0.0 {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        } else {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let weights: Vec<f64> = row
                .iter()
                .map(|&x| (f64::from(x - max) / temperature).exp())
                .collect();
            state = splitmix64(state);
            let mut pick = (state >> 11) as f64 / (1u64 << 53) as f64 * weights.iter().sum::<f64>();
            weights
                .iter()
                .position(|&w| {
                    pick -= w;
                    pick <= 0.0
                })
                .unwrap_or(weights.len() - 1)
        };
        tokens.push(next as u32);
    }
    Ok(tokenizer.decode(&tokens))
}
