//! Counting: parameters (total and by kind) and forward FLOPs. The partitioner's per-rank reports
//! and the cost model build on the same per-op figures, so they live here, next to the ops.
//!
//! FLOP conventions (forward, per op): a matmul costs `2·m·n·k` per batch element, the figure the
//! Megatron paper's `24·B·s·l·h²(1 + s/6h + V/16lh)` counts (×3 for forward + backward);
//! elementwise arithmetic costs 1 per output element; GeLU/SiLU 8; LayerNorm 8, RMSNorm 5,
//! softmax 5 and cross-entropy 5 per input element; rotary 3; data movement and collectives 0.
//! Only the matmul figure is a convention shared across the field; the rest is an estimate.

use crate::graph::{EntityRef, Graph, ValueDef};
use crate::op::Op;
use serde::Serialize;

/// What a parameter is for, judged by how the graph uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A lookup table: token embeddings, or a position table read through a slice.
    Embedding,
    /// A matmul operand that is not an embedding (projection weights).
    Matmul,
    /// A rank-1 addend (projection biases).
    Bias,
    /// A normalization's weight or bias.
    Norm,
    /// Anything else.
    Other,
}

impl ParamKind {
    /// All kinds, in report order.
    pub const ALL: [ParamKind; 5] = [
        ParamKind::Embedding,
        ParamKind::Matmul,
        ParamKind::Bias,
        ParamKind::Norm,
        ParamKind::Other,
    ];

    /// The kind's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ParamKind::Embedding => "embedding",
            ParamKind::Matmul => "matmul",
            ParamKind::Bias => "bias",
            ParamKind::Norm => "norm",
            ParamKind::Other => "other",
        }
    }
}

/// Classifies every parameter (indexed like `g.params`). An embedding table tied to the output
/// layer stays an embedding: the strongest use wins.
pub fn param_kinds(g: &Graph) -> Vec<ParamKind> {
    let mut kinds = vec![ParamKind::Other; g.params.len()];
    let mut mark = |v, kind: ParamKind| {
        if let ValueDef::Param(p) = g.values[v].def {
            let k = &mut kinds[p.index()];
            *k = (*k).min(kind);
        }
    };
    for &n in &g.order {
        match &g.nodes[n].op {
            Op::Embedding { table, .. } => mark(*table, ParamKind::Embedding),
            Op::Slice { x, .. } => mark(*x, ParamKind::Embedding),
            Op::MatMul { a, b, .. } => {
                mark(*a, ParamKind::Matmul);
                mark(*b, ParamKind::Matmul);
            }
            Op::LayerNorm { weight, bias, .. } => {
                weight
                    .iter()
                    .chain(bias)
                    .for_each(|&v| mark(v, ParamKind::Norm));
            }
            Op::RmsNorm { weight, .. } => weight.iter().for_each(|&v| mark(v, ParamKind::Norm)),
            Op::Add(a, b) => {
                for &v in [a, b] {
                    if g.ty(v).shape.rank() == 1 {
                        mark(v, ParamKind::Bias);
                    }
                }
            }
            _ => {}
        }
    }
    kinds
}

/// Parameter counts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParamCount {
    /// Every parameter element, tied parameters once.
    pub total: u64,
    /// Elements per kind, in [`ParamKind::ALL`] order, kinds with none left out.
    pub by_kind: Vec<(ParamKind, u64)>,
}

/// Counts the parameters of `g`.
pub fn count_params(g: &Graph) -> ParamCount {
    let kinds = param_kinds(g);
    let mut by_kind = [0u64; 5];
    for (p, data) in g.params.iter() {
        let n = g.ty(data.value).shape.numel().unwrap_or(u64::MAX);
        let slot = &mut by_kind[kinds[p.index()] as usize];
        *slot = slot.saturating_add(n);
    }
    ParamCount {
        total: by_kind.iter().fold(0u64, |a, &b| a.saturating_add(b)),
        by_kind: ParamKind::ALL
            .iter()
            .zip(by_kind)
            .filter(|&(_, n)| n > 0)
            .map(|(&k, n)| (k, n))
            .collect(),
    }
}

/// Forward FLOPs of one node, split into matmul and everything else.
pub fn node_flops(g: &Graph, op: &Op, outputs: &[crate::ValueId]) -> (u128, u128) {
    let out = |i: usize| g.ty(outputs[i]).shape.numel().unwrap_or(u64::MAX) as u128;
    let numel = |v| g.ty(v).shape.numel().unwrap_or(u64::MAX) as u128;
    match op {
        Op::MatMul { a, transpose_a, .. } => {
            let s = &g.ty(*a).shape;
            let k = s.size(s.rank() - if *transpose_a { 2 } else { 1 }) as u128;
            (out(0).saturating_mul(2).saturating_mul(k), 0)
        }
        Op::Add(..) | Op::Sub(..) | Op::Mul(..) | Op::Div(..) => (0, out(0)),
        Op::Scale { .. } | Op::Relu(_) | Op::Dropout { .. } => (0, out(0)),
        Op::Gelu(_) | Op::GeluTanh(_) | Op::Silu(_) => (0, out(0).saturating_mul(8)),
        Op::LayerNorm { .. } => (0, out(0).saturating_mul(8)),
        Op::RmsNorm { .. } => (0, out(0).saturating_mul(5)),
        Op::Softmax { .. } => (0, out(0).saturating_mul(5)),
        Op::Rotary { .. } => (0, out(0).saturating_mul(3)),
        Op::CrossEntropy { logits, .. } => (0, numel(*logits).saturating_mul(5)),
        Op::Embedding { .. }
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::Split { .. }
        | Op::Concat { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::F { .. }
        | Op::G { .. }
        | Op::LocalSlice { .. }
        | Op::Fill { .. }
        | Op::Expand { .. }
        | Op::Pad { .. } => (0, 0),
        Op::SumTo { x, .. } => (0, numel(*x)),
        Op::ActGrad { .. } | Op::DropoutGrad { .. } => (0, out(0).saturating_mul(8)),
        Op::LayerNormGrad { .. } | Op::RmsNormGrad { .. } => (0, out(0).saturating_mul(12)),
        Op::SoftmaxGrad { .. } => (0, out(0).saturating_mul(4)),
        Op::EmbeddingGrad { dy, .. } => (0, numel(*dy)),
        Op::CrossEntropyGrad { logits, .. } => (0, numel(*logits).saturating_mul(5)),
    }
}

/// Forward FLOPs of a whole graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FlopCount {
    /// FLOPs in matmuls.
    pub matmul: u128,
    /// FLOPs in everything else.
    pub other: u128,
}

impl FlopCount {
    /// All forward FLOPs.
    pub fn total(&self) -> u128 {
        self.matmul.saturating_add(self.other)
    }
}

/// Counts the forward FLOPs of one step (one evaluation of `g`).
pub fn forward_flops(g: &Graph) -> FlopCount {
    let mut count = FlopCount {
        matmul: 0,
        other: 0,
    };
    for &n in &g.order {
        let node = &g.nodes[n];
        let (m, o) = node_flops(g, &node.op, &node.outputs);
        count.matmul = count.matmul.saturating_add(m);
        count.other = count.other.saturating_add(o);
    }
    count
}

/// Tokens processed per step: the element count of the first integer input (the token ids).
pub fn tokens_per_step(g: &Graph) -> Option<u64> {
    g.inputs
        .iter()
        .find(|&&v| g.ty(v).dtype.is_int())
        .and_then(|&v| g.ty(v).shape.numel())
}
