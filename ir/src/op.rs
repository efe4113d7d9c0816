//! The op set: one closed, serde-derived enum shared by the model files, the one-device graph and
//! the partitioned plan.
//!
//! [`Op`] is generic over how it refers to values (`V`) and dimension sizes (`D`): a model file
//! holds `Op<String, DimExpr>` (names and expressions such as `"4 * hidden"`), the graph holds
//! `Op<ValueId, Dim>`, and shape inference works on `Op<TensorType, Dim>`. [`Op::try_map`] is the
//! one place that converts between them, so adding an op means adding it here and to the matches
//! that give it meaning (shape inference, FLOPs, later sharding and autodiff rules).
//!
//! Conventions every backend follows:
//! - Elementwise binary ops broadcast as NumPy does (dimensions aligned from the right).
//! - `MatMul` contracts the last axis of `a` with the second-to-last of `b` (after the optional
//!   transposes of the last two axes); leading axes are batch axes and broadcast.
//! - Normalizations and softmax work over the last axis.
//! - `Rotary` takes `[..., seq, heads, head_dim]` and rotates the pairs `(i, i + head_dim/2)` by
//!   `position · base^(−2i/head_dim)`, position being the index along axis −3 (the Llama / GPT-NeoX
//!   "rotate half" form); with `scaling`, the frequencies are rescaled as Llama 3.1's are
//!   ([`crate::index::rotary_frequency`]).
//! - `CrossEntropy` takes logits `[..., seq, vocab]` and integer targets `[..., seq]` and returns the
//!   mean loss as a scalar; with `shift` (next-token prediction) position `t` predicts target
//!   `t + 1` and the last position predicts nothing.

use crate::shape::Dim;
use crate::ValueId;
use serde::{Deserialize, Serialize};

/// A mesh axis: which group of ranks a collective runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MeshAxis {
    /// The tensor-parallel group.
    Tp,
    /// The data-parallel group.
    Dp,
}

/// A constant scale factor, or one derived from a dimension (so it follows `--dim` overrides).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Factor<D> {
    /// A literal factor.
    Const(f64),
    /// `1 / sqrt(d)`: attention's score scaling by the head dimension.
    InvSqrt(D),
}

impl Factor<Dim> {
    /// The factor's value.
    pub fn value(&self) -> f64 {
        match self {
            Factor::Const(c) => *c,
            Factor::InvSqrt(d) => 1.0 / (d.size as f64).sqrt(),
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}

fn none<T>() -> Option<T> {
    None
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One operation. See the module docs for the conventions each op follows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum Op<V = ValueId, D = Dim> {
    /// Row lookup: `table[ids]`, `table: [rows, width]`, integer `ids: [...]` → `[..., width]`.
    Embedding { table: V, ids: V },
    /// Batched matrix product with broadcasting batch axes.
    MatMul {
        a: V,
        b: V,
        #[serde(default, skip_serializing_if = "is_false")]
        transpose_a: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        transpose_b: bool,
    },
    /// `a + b`, broadcasting.
    Add(V, V),
    /// `a − b`, broadcasting.
    Sub(V, V),
    /// `a · b` elementwise, broadcasting.
    Mul(V, V),
    /// `a / b` elementwise, broadcasting.
    Div(V, V),
    /// `x · factor`.
    Scale { x: V, factor: Factor<D> },
    /// Exact GeLU: `x · Φ(x)`.
    Gelu(V),
    /// GPT-2's tanh approximation of GeLU.
    GeluTanh(V),
    /// `x · sigmoid(x)` (Llama's SwiGLU gate).
    Silu(V),
    /// `max(x, 0)`.
    Relu(V),
    /// Layer normalization over the last axis, with optional affine weight and bias.
    LayerNorm {
        x: V,
        #[serde(default = "none")]
        weight: Option<V>,
        #[serde(default = "none")]
        bias: Option<V>,
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// Root-mean-square normalization over the last axis, with an optional weight.
    RmsNorm {
        x: V,
        #[serde(default = "none")]
        weight: Option<V>,
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// Softmax over the last axis; `causal` masks key `j > i + (keys − queries)` for query `i`.
    Softmax {
        x: V,
        #[serde(default, skip_serializing_if = "is_false")]
        causal: bool,
    },
    /// Same elements, new shape (row-major).
    Reshape { x: V, shape: Vec<D> },
    /// Axis permutation: output axis `i` is input axis `perm[i]`.
    Transpose { x: V, perm: Vec<usize> },
    /// `x[start..end]` along dimension `dim` (negative: from the end). Model files may spell the
    /// field `axis`, as earlier versions did.
    Slice {
        x: V,
        #[serde(alias = "axis")]
        dim: i64,
        start: D,
        end: D,
    },
    /// Consecutive pieces of `x` along dimension `dim`, one output per size.
    Split {
        x: V,
        #[serde(alias = "axis")]
        dim: i64,
        sizes: Vec<D>,
    },
    /// The inputs joined along dimension `dim`.
    Concat {
        xs: Vec<V>,
        #[serde(alias = "axis")]
        dim: i64,
    },
    /// Rotary position embedding (see the module docs for the layout).
    Rotary {
        x: V,
        #[serde(default = "default_rope_base")]
        base: f64,
        /// Rotate by the negative angles (the transpose: rotary's vector-Jacobian product).
        #[serde(default, skip_serializing_if = "is_false")]
        inverse: bool,
        /// Llama 3.1's rescaling of the frequencies, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scaling: Option<RopeScaling>,
    },
    /// Zeroes each element with probability `p` and scales the rest by `1/(1−p)` in training.
    Dropout { x: V, p: f64 },
    /// Mean cross-entropy of integer targets under softmax(logits); a scalar.
    CrossEntropy {
        logits: V,
        targets: V,
        #[serde(default = "yes")]
        shift: bool,
        /// The real number of classes when the class axis is padded (the partitioner pads the
        /// vocabulary): classes at or past it are excluded from the softmax. It counts the whole
        /// class axis, across ranks when the logits are vocabulary-parallel.
        #[serde(default = "none", skip_serializing_if = "Option::is_none")]
        classes: Option<D>,
    },
    /// Sum over the group; every rank gets the total.
    AllReduce { x: V, axis: MeshAxis },
    /// Concatenation of the group's shards along `dim` (`parts` ranks). Its backward takes this
    /// rank's slice of the gradient, or, with `partial_grad` (the gathered value enters a
    /// tensor-parallel region, so its gradient arrives as a partial sum: sequence parallelism's f),
    /// reduce-scatters it.
    AllGather {
        x: V,
        dim: i64,
        axis: MeshAxis,
        parts: u64,
        #[serde(default, skip_serializing_if = "is_false")]
        partial_grad: bool,
    },
    /// Sum over the group, each rank keeping its `1/parts` slice along `dim`.
    ReduceScatter {
        x: V,
        dim: i64,
        axis: MeshAxis,
        parts: u64,
    },
    /// The paper's f: identity forward, all-reduce of the gradient backward.
    F { x: V, axis: MeshAxis },
    /// The paper's g: all-reduce forward, identity backward.
    G { x: V, axis: MeshAxis },
    /// This rank's `1/parts` slice of a replicated `x` along `dim`; no communication (backward:
    /// all-gather).
    LocalSlice {
        x: V,
        dim: i64,
        axis: MeshAxis,
        parts: u64,
    },

    // Backward ops: what autodiff emits. Each is the vector-Jacobian product of a forward op,
    // fused where composing it from primitives would need reductions the op set lacks.
    /// Sums `x` over the axes it was broadcast along, down to `shape` (the VJP of broadcasting).
    SumTo { x: V, shape: Vec<D> },
    /// A constant tensor.
    Fill {
        shape: Vec<D>,
        value: f64,
        dtype: crate::DType,
    },
    /// Zero padding along dimension `dim`: `before` zeros, `x`, `after` zeros (the VJP of
    /// `Slice`).
    Pad {
        x: V,
        #[serde(alias = "axis")]
        dim: i64,
        before: D,
        after: D,
    },
    /// `dy · act'(x)` for an elementwise activation.
    ActGrad { act: Activation, x: V, dy: V },
    /// LayerNorm's VJP: `(dx, dweight, dbias)`, the last two of shape `[last axis]`.
    LayerNormGrad {
        x: V,
        #[serde(default = "none")]
        weight: Option<V>,
        dy: V,
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// RMSNorm's VJP: `(dx, dweight)`.
    RmsNormGrad {
        x: V,
        #[serde(default = "none")]
        weight: Option<V>,
        dy: V,
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// Softmax's VJP from its output `y`: `y · (dy − Σ dy·y)`.
    SoftmaxGrad { y: V, dy: V },
    /// The embedding table's gradient: `dy` rows scatter-added at `ids` into a zero table shaped
    /// like `table` (which is read only for its shape and, when vocabulary-parallel, its range).
    EmbeddingGrad { table: V, ids: V, dy: V },
    /// The logits' gradient of `CrossEntropy`, scaled by the scalar `dloss`.
    CrossEntropyGrad {
        logits: V,
        targets: V,
        dloss: V,
        #[serde(default = "yes")]
        shift: bool,
        #[serde(default = "none", skip_serializing_if = "Option::is_none")]
        classes: Option<D>,
    },
    /// Dropout's VJP: `dy` through the same mask the forward node `forward` drew.
    DropoutGrad { dy: V, forward: V, p: f64 },
    /// `x` broadcast to `shape` (NumPy rules): Llama's `repeat_kv`, each key/value head repeated
    /// for its group of query heads.
    Expand { x: V, shape: Vec<D> },
}

/// The elementwise activations, as [`Op::ActGrad`] names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Activation {
    Gelu,
    GeluTanh,
    Silu,
    Relu,
}

/// Llama 3.1's frequency rescaling of rotary position embedding (`rope_scaling` with
/// `rope_type: "llama3"`): frequencies whose wavelength exceeds the original context over
/// `low_freq_factor` are divided by `factor`, those under the context over `high_freq_factor`
/// are kept, and the ones between are blended ([`crate::index::rotary_frequency`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// How much longer the context became.
    pub factor: f64,
    /// The wavelength threshold (in contexts) above which frequencies are divided by `factor`.
    pub low_freq_factor: f64,
    /// The threshold below which frequencies are kept.
    pub high_freq_factor: f64,
    /// The context the model was first trained at.
    pub original_max_position: u64,
}

fn default_rope_base() -> f64 {
    10000.0
}

/// The op names a model file may use, in declaration order.
pub const OP_NAMES: &[&str] = &[
    "Embedding",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Scale",
    "Gelu",
    "GeluTanh",
    "Silu",
    "Relu",
    "LayerNorm",
    "RmsNorm",
    "Softmax",
    "Reshape",
    "Transpose",
    "Slice",
    "Split",
    "Concat",
    "Rotary",
    "Dropout",
    "CrossEntropy",
    "AllReduce",
    "AllGather",
    "ReduceScatter",
    "F",
    "G",
    "LocalSlice",
    "SumTo",
    "Fill",
    "Pad",
    "ActGrad",
    "LayerNormGrad",
    "RmsNormGrad",
    "SoftmaxGrad",
    "EmbeddingGrad",
    "CrossEntropyGrad",
    "DropoutGrad",
    "Expand",
];

impl<V, D> Op<V, D> {
    /// The op's name as written in a model file (`"MatMul"`).
    pub fn mnemonic(&self) -> &'static str {
        OP_NAMES[self.index()]
    }

    fn index(&self) -> usize {
        match self {
            Op::Embedding { .. } => 0,
            Op::MatMul { .. } => 1,
            Op::Add(..) => 2,
            Op::Sub(..) => 3,
            Op::Mul(..) => 4,
            Op::Div(..) => 5,
            Op::Scale { .. } => 6,
            Op::Gelu(_) => 7,
            Op::GeluTanh(_) => 8,
            Op::Silu(_) => 9,
            Op::Relu(_) => 10,
            Op::LayerNorm { .. } => 11,
            Op::RmsNorm { .. } => 12,
            Op::Softmax { .. } => 13,
            Op::Reshape { .. } => 14,
            Op::Transpose { .. } => 15,
            Op::Slice { .. } => 16,
            Op::Split { .. } => 17,
            Op::Concat { .. } => 18,
            Op::Rotary { .. } => 19,
            Op::Dropout { .. } => 20,
            Op::CrossEntropy { .. } => 21,
            Op::AllReduce { .. } => 22,
            Op::AllGather { .. } => 23,
            Op::ReduceScatter { .. } => 24,
            Op::F { .. } => 25,
            Op::G { .. } => 26,
            Op::LocalSlice { .. } => 27,
            Op::SumTo { .. } => 28,
            Op::Fill { .. } => 29,
            Op::Pad { .. } => 30,
            Op::ActGrad { .. } => 31,
            Op::LayerNormGrad { .. } => 32,
            Op::RmsNormGrad { .. } => 33,
            Op::SoftmaxGrad { .. } => 34,
            Op::EmbeddingGrad { .. } => 35,
            Op::CrossEntropyGrad { .. } => 36,
            Op::DropoutGrad { .. } => 37,
            Op::Expand { .. } => 38,
        }
    }

    /// How many values the op produces.
    pub fn num_outputs(&self) -> usize {
        match self {
            Op::Split { sizes, .. } => sizes.len(),
            Op::LayerNormGrad { .. } => 3,
            Op::RmsNormGrad { .. } => 2,
            _ => 1,
        }
    }

    /// Whether the op communicates across ranks.
    pub fn is_collective(&self) -> bool {
        matches!(
            self,
            Op::AllReduce { .. }
                | Op::AllGather { .. }
                | Op::ReduceScatter { .. }
                | Op::F { .. }
                | Op::G { .. }
        )
    }

    /// Whether the op belongs to a backward pass (autodiff emits it; it has no VJP itself).
    pub fn is_backward(&self) -> bool {
        matches!(
            self,
            Op::SumTo { .. }
                | Op::Fill { .. }
                | Op::Pad { .. }
                | Op::ActGrad { .. }
                | Op::LayerNormGrad { .. }
                | Op::RmsNormGrad { .. }
                | Op::SoftmaxGrad { .. }
                | Op::EmbeddingGrad { .. }
                | Op::CrossEntropyGrad { .. }
                | Op::DropoutGrad { .. }
        )
    }

    /// The op's inputs, in a fixed order (absent optional inputs are skipped).
    pub fn inputs(&self) -> Vec<&V> {
        let mut out = Vec::with_capacity(3);
        let _ = self.try_map::<(), (), (), _, _>(
            |v| {
                out.push(v);
                Ok(())
            },
            |_| Ok(()),
        );
        out
    }

    /// The inputs whose data the op reads: [`Op::inputs`] less a `DropoutGrad`'s `forward`, of
    /// which only the place in the full tensor matters (its mask is drawn again from the
    /// elements' indices), so a run need not hold the dropout's output until the backward.
    pub fn data_inputs(&self) -> Vec<&V> {
        match self {
            Op::DropoutGrad { dy, .. } => vec![dy],
            _ => self.inputs(),
        }
    }

    /// Rebuilds the op with every value reference passed through `fv` and every dimension through
    /// `fd`; the first error stops the conversion.
    pub fn try_map<'a, V2, D2, E, FV, FD>(&'a self, mut fv: FV, mut fd: FD) -> Result<Op<V2, D2>, E>
    where
        FV: FnMut(&'a V) -> Result<V2, E>,
        FD: FnMut(&'a D) -> Result<D2, E>,
    {
        let opt = |v: &'a Option<V>, fv: &mut FV| v.as_ref().map(&mut *fv).transpose();
        Ok(match self {
            Op::Embedding { table, ids } => Op::Embedding {
                table: fv(table)?,
                ids: fv(ids)?,
            },
            Op::MatMul {
                a,
                b,
                transpose_a,
                transpose_b,
            } => Op::MatMul {
                a: fv(a)?,
                b: fv(b)?,
                transpose_a: *transpose_a,
                transpose_b: *transpose_b,
            },
            Op::Add(a, b) => Op::Add(fv(a)?, fv(b)?),
            Op::Sub(a, b) => Op::Sub(fv(a)?, fv(b)?),
            Op::Mul(a, b) => Op::Mul(fv(a)?, fv(b)?),
            Op::Div(a, b) => Op::Div(fv(a)?, fv(b)?),
            Op::Scale { x, factor } => Op::Scale {
                x: fv(x)?,
                factor: match factor {
                    Factor::Const(c) => Factor::Const(*c),
                    Factor::InvSqrt(d) => Factor::InvSqrt(fd(d)?),
                },
            },
            Op::Gelu(x) => Op::Gelu(fv(x)?),
            Op::GeluTanh(x) => Op::GeluTanh(fv(x)?),
            Op::Silu(x) => Op::Silu(fv(x)?),
            Op::Relu(x) => Op::Relu(fv(x)?),
            Op::LayerNorm {
                x,
                weight,
                bias,
                eps,
            } => Op::LayerNorm {
                x: fv(x)?,
                weight: opt(weight, &mut fv)?,
                bias: opt(bias, &mut fv)?,
                eps: *eps,
            },
            Op::RmsNorm { x, weight, eps } => Op::RmsNorm {
                x: fv(x)?,
                weight: opt(weight, &mut fv)?,
                eps: *eps,
            },
            Op::Softmax { x, causal } => Op::Softmax {
                x: fv(x)?,
                causal: *causal,
            },
            Op::Reshape { x, shape } => Op::Reshape {
                x: fv(x)?,
                shape: shape.iter().map(&mut fd).collect::<Result<_, _>>()?,
            },
            Op::Transpose { x, perm } => Op::Transpose {
                x: fv(x)?,
                perm: perm.clone(),
            },
            Op::Slice { x, dim, start, end } => Op::Slice {
                x: fv(x)?,
                dim: *dim,
                start: fd(start)?,
                end: fd(end)?,
            },
            Op::Split { x, dim, sizes } => Op::Split {
                x: fv(x)?,
                dim: *dim,
                sizes: sizes.iter().map(&mut fd).collect::<Result<_, _>>()?,
            },
            Op::Concat { xs, dim } => Op::Concat {
                xs: xs.iter().map(&mut fv).collect::<Result<_, _>>()?,
                dim: *dim,
            },
            Op::Rotary {
                x,
                base,
                inverse,
                scaling,
            } => Op::Rotary {
                x: fv(x)?,
                base: *base,
                inverse: *inverse,
                scaling: *scaling,
            },
            Op::Dropout { x, p } => Op::Dropout { x: fv(x)?, p: *p },
            Op::CrossEntropy {
                logits,
                targets,
                shift,
                classes,
            } => Op::CrossEntropy {
                logits: fv(logits)?,
                targets: fv(targets)?,
                shift: *shift,
                classes: classes.as_ref().map(&mut fd).transpose()?,
            },
            Op::AllReduce { x, axis } => Op::AllReduce {
                x: fv(x)?,
                axis: *axis,
            },
            Op::AllGather {
                x,
                dim,
                axis,
                parts,
                partial_grad,
            } => Op::AllGather {
                x: fv(x)?,
                dim: *dim,
                axis: *axis,
                parts: *parts,
                partial_grad: *partial_grad,
            },
            Op::ReduceScatter {
                x,
                dim,
                axis,
                parts,
            } => Op::ReduceScatter {
                x: fv(x)?,
                dim: *dim,
                axis: *axis,
                parts: *parts,
            },
            Op::F { x, axis } => Op::F {
                x: fv(x)?,
                axis: *axis,
            },
            Op::G { x, axis } => Op::G {
                x: fv(x)?,
                axis: *axis,
            },
            Op::LocalSlice {
                x,
                dim,
                axis,
                parts,
            } => Op::LocalSlice {
                x: fv(x)?,
                dim: *dim,
                axis: *axis,
                parts: *parts,
            },
            Op::SumTo { x, shape } => Op::SumTo {
                x: fv(x)?,
                shape: shape.iter().map(&mut fd).collect::<Result<_, _>>()?,
            },
            Op::Fill {
                shape,
                value,
                dtype,
            } => Op::Fill {
                shape: shape.iter().map(&mut fd).collect::<Result<_, _>>()?,
                value: *value,
                dtype: *dtype,
            },
            Op::Pad {
                x,
                dim,
                before,
                after,
            } => Op::Pad {
                x: fv(x)?,
                dim: *dim,
                before: fd(before)?,
                after: fd(after)?,
            },
            Op::ActGrad { act, x, dy } => Op::ActGrad {
                act: *act,
                x: fv(x)?,
                dy: fv(dy)?,
            },
            Op::LayerNormGrad { x, weight, dy, eps } => Op::LayerNormGrad {
                x: fv(x)?,
                weight: opt(weight, &mut fv)?,
                dy: fv(dy)?,
                eps: *eps,
            },
            Op::RmsNormGrad { x, weight, dy, eps } => Op::RmsNormGrad {
                x: fv(x)?,
                weight: opt(weight, &mut fv)?,
                dy: fv(dy)?,
                eps: *eps,
            },
            Op::SoftmaxGrad { y, dy } => Op::SoftmaxGrad {
                y: fv(y)?,
                dy: fv(dy)?,
            },
            Op::EmbeddingGrad { table, ids, dy } => Op::EmbeddingGrad {
                table: fv(table)?,
                ids: fv(ids)?,
                dy: fv(dy)?,
            },
            Op::CrossEntropyGrad {
                logits,
                targets,
                dloss,
                shift,
                classes,
            } => Op::CrossEntropyGrad {
                logits: fv(logits)?,
                targets: fv(targets)?,
                dloss: fv(dloss)?,
                shift: *shift,
                classes: classes.as_ref().map(&mut fd).transpose()?,
            },
            Op::DropoutGrad { dy, forward, p } => Op::DropoutGrad {
                dy: fv(dy)?,
                forward: fv(forward)?,
                p: *p,
            },
            Op::Expand { x, shape } => Op::Expand {
                x: fv(x)?,
                shape: shape.iter().map(&mut fd).collect::<Result<_, _>>()?,
            },
        })
    }
}
