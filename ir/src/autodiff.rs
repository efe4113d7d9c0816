//! Reverse-mode automatic differentiation: [`backward`] appends the backward pass of a scalar loss
//! to the graph that computes it, as ordinary nodes of the same IR.
//!
//! ```text
//! Graph (forward) ──► partitioner ──► Plan: SPMD graph with collectives ──► backward ──► runtime
//! ```
//!
//! It runs on the partitioned SPMD graph, after communication has been inserted, so collectives are
//! differentiated like any other op and turn into their conjugates (the paper's f ↔ g, all-gather ↔
//! reduce-scatter or slice, local slice → all-gather): the backward pass's communication is derived,
//! never placed by hand. It works as well on the one-device graph, which has no collectives.
//!
//! The pass walks the forward nodes once in reverse program order. Only float values that depend on
//! a parameter get a gradient (graph inputs and integer tensors never do); a node none of whose
//! outputs has a gradient is skipped, and so is an input that needs none. Each forward op's
//! vector-Jacobian product is built from the forward ops and the backward ops of [`crate::op`]
//! ([`Op::SumTo`] where broadcasting made shapes differ, [`Op::LayerNormGrad`], ...); a value used
//! several times has its contributions summed with `Add` nodes as they arrive, which is complete by
//! the time the walk reaches the value's definition because program order is topological.
//!
//! Names: the seed is `bwd.seed`; the nodes computing the VJP of forward node `N` are `bwd.N.0`,
//! `bwd.N.1`, ... (outputs named like their node, or `bwd.N.k.i` for several outputs); the sums of
//! value `V`'s contributions are `bwd.V.acc0`, `bwd.V.acc1`, .... Backward nodes get the scope of
//! the forward node they differentiate (a sum, that of the node whose contribution it adds),
//! so a layer's backward groups with the layer and stays contiguous in program order. Should a name
//! already exist (a forward name that looks like a generated one), `~1`, `~2`, ... is appended, so
//! the result always verifies.
//!
//! The pass is linear in the graph's size: per-entity tables ([`SecondaryMap`]) instead of maps
//! keyed by name, and a set of name hashes for the uniqueness check. It must handle graphs of
//! hundreds of thousands of nodes (thousands of layers) within the partitioner's time budget.

use crate::graph::{Graph, NodeId, ParamId, ScopeId, SecondaryMap, ValueId};
use crate::infer::OpError;
use crate::op::{Activation, Factor, Op};
use crate::shape::{Dim, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use thiserror::Error;

/// What [`backward`] added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backward {
    /// Every parameter the loss depends on, with the value holding d loss / d param (same type as
    /// the param), in ParamId order.
    pub param_grads: Vec<(ParamId, ValueId)>,
    /// Index into `g.order` of the first backward node.
    pub start: usize,
    /// The seed value (d loss / d loss = 1, a Fill).
    pub seed: ValueId,
    /// Each backward value that is a gradient contribution to a forward value, or a running sum
    /// of such contributions, with that forward value (it has the same shape). The partitioner
    /// lays these out like their forward values.
    pub grad_of: Vec<(ValueId, ValueId)>,
    /// Each backward node (the seed aside) with the forward node whose vector-Jacobian product
    /// it belongs to (for a running sum: the node whose contribution it adds). Pipeline stages
    /// place a backward node on its forward node's stage.
    pub origin: Vec<(NodeId, NodeId)>,
}

/// Why the backward pass cannot be built.
#[derive(Clone, Debug, PartialEq, Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum AutodiffError {
    /// The loss is not a float scalar.
    #[error("the loss `{name}` must be a float scalar, found {ty}")]
    LossNotScalar { name: String, ty: TensorType },
    /// The gradient has to flow through an op that has no vector-Jacobian product (a backward op).
    #[error(
        "node `{node}` ({op}) has no vector-Jacobian product, but the loss's gradient flows \
         through it"
    )]
    NoVjp { node: String, op: &'static str },
    /// A vector-Jacobian product that does not type-check: a bug in autodiff, not in the graph.
    #[error("internal error: the backward pass of node `{node}` does not type-check: {error}")]
    IllTyped { node: String, error: Box<OpError> },
}

/// Appends the backward pass of `g` for the scalar `loss` to `g` (new nodes at the end of `order`).
///
/// On a [`AutodiffError::LossNotScalar`] or [`AutodiffError::NoVjp`] error `g` is left unchanged.
pub fn backward(g: &mut Graph, loss: ValueId) -> Result<Backward, AutodiffError> {
    let ty = g.ty(loss);
    if !(ty.dtype.is_float() && ty.shape.rank() == 0) {
        return Err(AutodiffError::LossNotScalar {
            name: g.values[loss].name.clone(),
            ty: ty.clone(),
        });
    }
    let dtype = ty.dtype;
    let start = g.order.len();
    let needs = needs_grad(g);
    check_differentiable(g, loss, &needs)?;
    let names = Names::of(g);
    let mut ad = Autodiff {
        grad: SecondaryMap::with_capacity(g.values.len()),
        acc: SecondaryMap::new(),
        needs,
        names,
        g,
        grad_of: Vec::new(),
        origin: Vec::new(),
    };

    let seed = ad
        .add(
            "bwd.seed".to_owned(),
            Op::Fill {
                shape: Vec::new(),
                value: 1.0,
                dtype,
            },
            None,
        )
        .map_err(|error| AutodiffError::IllTyped {
            node: "bwd.seed".into(),
            error: Box::new(error),
        })?;
    let seed = ad.g.nodes[seed].outputs[0];
    ad.grad[loss] = Some(seed);

    for i in (0..start).rev() {
        let n = ad.g.order[i];
        let node = &ad.g.nodes[n];
        if !node.outputs.iter().any(|&v| ad.grad[v].is_some())
            || !node.op.inputs().iter().any(|&&v| ad.needs[v])
        {
            continue;
        }
        let op = node.op.clone();
        let mut cx = Cx {
            node: n,
            prefix: format!("bwd.{}.", node.name),
            k: 0,
            scope: node.scope,
        };
        ad.vjp(&mut cx, &op)?;
    }

    let param_grads =
        ad.g.params
            .iter()
            .filter_map(|(p, data)| ad.grad[data.value].map(|v| (p, v)))
            .collect();
    Ok(Backward {
        param_grads,
        start,
        seed,
        grad_of: ad.grad_of,
        origin: ad.origin,
    })
}

/// Which values get a gradient: float values that depend on a parameter.
fn needs_grad(g: &Graph) -> SecondaryMap<ValueId, bool> {
    let mut needs = SecondaryMap::with_capacity(g.values.len());
    for p in g.params.values() {
        needs[p.value] = g.ty(p.value).dtype.is_float();
    }
    for &n in &g.order {
        let node = &g.nodes[n];
        if node.op.inputs().iter().any(|&&v| needs[v]) {
            for &o in &node.outputs {
                needs[o] = g.ty(o).dtype.is_float();
            }
        }
    }
    needs
}

/// Fails if the gradient must flow through an op without a VJP, before anything is added: the same
/// reverse walk as the pass itself, marking the values that will get a gradient.
fn check_differentiable(
    g: &Graph,
    loss: ValueId,
    needs: &SecondaryMap<ValueId, bool>,
) -> Result<(), AutodiffError> {
    let mut gets_grad: SecondaryMap<ValueId, bool> = SecondaryMap::with_capacity(g.values.len());
    gets_grad[loss] = true;
    for &n in g.order.iter().rev() {
        let node = &g.nodes[n];
        if !node.outputs.iter().any(|&v| gets_grad[v]) {
            continue;
        }
        // Every VJP contributes to each of its inputs that needs a gradient.
        let mut flows = false;
        for &v in node.op.inputs() {
            if needs[v] {
                gets_grad[v] = true;
                flows = true;
            }
        }
        if flows && node.op.is_backward() {
            return Err(AutodiffError::NoVjp {
                node: node.name.clone(),
                op: node.op.mnemonic(),
            });
        }
    }
    Ok(())
}

/// A hasher for keys that are already hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type HashSet64 = HashSet<u64, BuildHasherDefault<Prehashed>>;

/// A fast, fixed 64-bit string hash (FxHash's mixing per 8 bytes, then MurmurHash3's finalizer):
/// deterministic across runs, so naming is too.
fn hash(name: &str) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let bytes = name.as_bytes();
    let mut h = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let word = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h.rotate_left(5) ^ word).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The node and value names in use, as hashes: a hash collision only costs a needless `~k`
/// suffix, and hashing every name once is far cheaper than holding them as strings.
struct Names {
    nodes: HashSet64,
    values: HashSet64,
}

impl Names {
    fn of(g: &Graph) -> Names {
        let mut nodes = HashSet64::default();
        nodes.reserve(3 * g.nodes.len());
        nodes.extend(g.nodes.values().map(|n| hash(&n.name)));
        let mut values = HashSet64::default();
        values.reserve(3 * g.values.len());
        values.extend(g.values.values().map(|v| hash(&v.name)));
        Names { nodes, values }
    }

    /// Claims `name` for a node with `outputs` outputs (or the first free `name~k`) and returns
    /// the node's name and its outputs' names.
    fn claim(&mut self, mut name: String, outputs: usize) -> (String, Vec<String>) {
        let base = name.len();
        let mut attempt = 0u32;
        loop {
            let value_names: Vec<String> = if outputs == 1 {
                vec![name.clone()]
            } else {
                (0..outputs).map(|i| format!("{name}.{i}")).collect()
            };
            let node_hash = hash(&name);
            let value_hashes: Vec<u64> = value_names.iter().map(|v| hash(v)).collect();
            if !self.nodes.contains(&node_hash)
                && !value_hashes.iter().any(|h| self.values.contains(h))
            {
                self.nodes.insert(node_hash);
                self.values.extend(value_hashes);
                return (name, value_names);
            }
            attempt += 1;
            name.truncate(base);
            let _ = write!(name, "~{attempt}");
        }
    }
}

/// The forward node being differentiated.
struct Cx {
    node: NodeId,
    /// `bwd.<node name>.`
    prefix: String,
    /// How many nodes its VJP has emitted so far.
    k: u32,
    scope: Option<ScopeId>,
}

struct Autodiff<'g> {
    g: &'g mut Graph,
    /// The gradient of each value so far (the running sum of its contributions).
    grad: SecondaryMap<ValueId, Option<ValueId>>,
    /// How many accumulation nodes each value has had.
    acc: SecondaryMap<ValueId, u32>,
    needs: SecondaryMap<ValueId, bool>,
    names: Names,
    grad_of: Vec<(ValueId, ValueId)>,
    origin: Vec<(NodeId, NodeId)>,
}

impl Autodiff<'_> {
    /// Adds a node named `name` (or a free variant of it).
    fn add(&mut self, name: String, op: Op, scope: Option<ScopeId>) -> Result<NodeId, OpError> {
        let (name, outputs) = self.names.claim(name, op.num_outputs());
        let n = self.g.nodes.next_key();
        self.g.add_node(name, op, outputs, scope)?;
        Ok(n)
    }

    fn ill_typed(&self, cx: &Cx, error: OpError) -> AutodiffError {
        AutodiffError::IllTyped {
            node: self.g.nodes[cx.node].name.clone(),
            error: Box::new(error),
        }
    }

    /// Emits the next node of `cx`'s VJP.
    fn emit(&mut self, cx: &mut Cx, op: Op) -> Result<NodeId, AutodiffError> {
        let mut name = String::with_capacity(cx.prefix.len() + 2);
        name.push_str(&cx.prefix);
        let _ = write!(name, "{}", cx.k);
        cx.k += 1;
        let n = self
            .add(name, op, cx.scope)
            .map_err(|error| self.ill_typed(cx, error))?;
        self.origin.push((n, cx.node));
        Ok(n)
    }

    /// Emits a single-output node and returns its output.
    fn emit1(&mut self, cx: &mut Cx, op: Op) -> Result<ValueId, AutodiffError> {
        let n = self.emit(cx, op)?;
        Ok(self.g.nodes[n].outputs[0])
    }

    /// Adds `c` to the gradient of `v`.
    fn contribute(&mut self, cx: &Cx, v: ValueId, c: ValueId) -> Result<(), AutodiffError> {
        debug_assert!(
            self.needs[v],
            "a contribution to a value that needs no gradient"
        );
        let (want, have) = (self.g.ty(v), self.g.ty(c));
        if want.dtype != have.dtype {
            let error = OpError::DtypeMismatch {
                lhs: want.dtype,
                rhs: have.dtype,
            };
            return Err(self.ill_typed(cx, error));
        }
        if want.shape != have.shape {
            let error = OpError::ShapeMismatch {
                what: "a gradient",
                expected: want.shape.clone(),
                found: have.shape.clone(),
            };
            return Err(self.ill_typed(cx, error));
        }
        self.grad_of.push((c, v));
        let Some(prev) = self.grad[v] else {
            self.grad[v] = Some(c);
            return Ok(());
        };
        let k = self.acc[v];
        self.acc[v] += 1;
        let name = format!("bwd.{}.acc{k}", self.g.values[v].name);
        let n = self
            .add(name, Op::Add(prev, c), cx.scope)
            .map_err(|error| self.ill_typed(cx, error))?;
        self.origin.push((n, cx.node));
        self.grad[v] = Some(self.g.nodes[n].outputs[0]);
        self.grad_of.push((self.g.nodes[n].outputs[0], v));
        Ok(())
    }

    /// Reduces a contribution to `target`'s shape where broadcasting made it larger.
    fn sum_to(
        &mut self,
        cx: &mut Cx,
        c: ValueId,
        target: ValueId,
    ) -> Result<ValueId, AutodiffError> {
        if self.g.ty(c).shape == self.g.ty(target).shape {
            return Ok(c);
        }
        let shape = self.g.ty(target).shape.0.clone();
        self.emit1(cx, Op::SumTo { x: c, shape })
    }

    /// `v` reshaped to rank 2 by merging every axis but the last.
    fn rows(&mut self, cx: &mut Cx, v: ValueId) -> Result<ValueId, AutodiffError> {
        let dims = &self.g.ty(v).shape.0;
        let (last, lead) = dims.split_last().expect("rank checked by the caller");
        let rows = lead.iter().map(|d| d.size).product();
        let shape = vec![Dim::new(rows), last.clone()];
        self.emit1(cx, Op::Reshape { x: v, shape })
    }

    fn vjp(&mut self, cx: &mut Cx, op: &Op) -> Result<(), AutodiffError> {
        let outputs = &self.g.nodes[cx.node].outputs;
        let y = outputs[0];
        // Every single-output node reaching here has a gradient on its output; Split reads its
        // outputs' gradients itself.
        let dy = self.grad[y].unwrap_or(y);
        let needs = |ad: &Self, v: ValueId| ad.needs[v];
        match op {
            Op::Embedding { table, ids } => {
                if needs(self, *table) {
                    let (table, ids) = (*table, *ids);
                    let d = self.emit1(cx, Op::EmbeddingGrad { table, ids, dy })?;
                    self.contribute(cx, table, d)?;
                }
            }
            Op::MatMul {
                a,
                b,
                transpose_a,
                transpose_b,
            } => self.matmul(cx, *a, *b, *transpose_a, *transpose_b, dy)?,
            Op::Add(a, b) => {
                for x in [*a, *b] {
                    if needs(self, x) {
                        let d = self.sum_to(cx, dy, x)?;
                        self.contribute(cx, x, d)?;
                    }
                }
            }
            Op::Sub(a, b) => {
                let (a, b) = (*a, *b);
                if needs(self, a) {
                    let d = self.sum_to(cx, dy, a)?;
                    self.contribute(cx, a, d)?;
                }
                if needs(self, b) {
                    // Reduce first, so the negation runs on the smaller tensor.
                    let d = self.sum_to(cx, dy, b)?;
                    let d = self.negate(cx, d)?;
                    self.contribute(cx, b, d)?;
                }
            }
            Op::Mul(a, b) => {
                let (a, b) = (*a, *b);
                if needs(self, a) {
                    let d = self.emit1(cx, Op::Mul(dy, b))?;
                    let d = self.sum_to(cx, d, a)?;
                    self.contribute(cx, a, d)?;
                }
                if needs(self, b) {
                    let d = self.emit1(cx, Op::Mul(dy, a))?;
                    let d = self.sum_to(cx, d, b)?;
                    self.contribute(cx, b, d)?;
                }
            }
            Op::Div(a, b) => {
                let (a, b) = (*a, *b);
                if needs(self, a) {
                    let d = self.emit1(cx, Op::Div(dy, b))?;
                    let d = self.sum_to(cx, d, a)?;
                    self.contribute(cx, a, d)?;
                }
                if needs(self, b) {
                    // d(a/b)/db = −(a/b)/b = −y/b.
                    let d = self.emit1(cx, Op::Mul(dy, y))?;
                    let d = self.emit1(cx, Op::Div(d, b))?;
                    let d = self.sum_to(cx, d, b)?;
                    let d = self.negate(cx, d)?;
                    self.contribute(cx, b, d)?;
                }
            }
            Op::Scale { x, factor } => {
                let factor = factor.clone();
                let d = self.emit1(cx, Op::Scale { x: dy, factor })?;
                self.contribute(cx, *x, d)?;
            }
            Op::Gelu(x) => self.activation(cx, Activation::Gelu, *x, dy)?,
            Op::GeluTanh(x) => self.activation(cx, Activation::GeluTanh, *x, dy)?,
            Op::Silu(x) => self.activation(cx, Activation::Silu, *x, dy)?,
            Op::Relu(x) => self.activation(cx, Activation::Relu, *x, dy)?,
            Op::LayerNorm {
                x,
                weight,
                bias,
                eps,
            } => {
                let (x, weight, bias) = (*x, *weight, *bias);
                let op = Op::LayerNormGrad {
                    x,
                    weight,
                    dy,
                    eps: *eps,
                };
                let n = self.emit(cx, op)?;
                let d = self.g.nodes[n].outputs.clone();
                // The grad op computes all three; each is used only where it is needed.
                for (v, d) in [(Some(x), d[0]), (weight, d[1]), (bias, d[2])] {
                    if let Some(v) = v.filter(|&v| needs(self, v)) {
                        self.contribute(cx, v, d)?;
                    }
                }
            }
            Op::RmsNorm { x, weight, eps } => {
                let (x, weight) = (*x, *weight);
                let op = Op::RmsNormGrad {
                    x,
                    weight,
                    dy,
                    eps: *eps,
                };
                let n = self.emit(cx, op)?;
                let d = self.g.nodes[n].outputs.clone();
                for (v, d) in [(Some(x), d[0]), (weight, d[1])] {
                    if let Some(v) = v.filter(|&v| needs(self, v)) {
                        self.contribute(cx, v, d)?;
                    }
                }
            }
            Op::Softmax { x, .. } => {
                // From the output: masked (causal) positions have y = 0, so their gradient is 0.
                let d = self.emit1(cx, Op::SoftmaxGrad { y, dy })?;
                self.contribute(cx, *x, d)?;
            }
            Op::Expand { x, .. } => {
                let d = self.sum_to(cx, dy, *x)?;
                self.contribute(cx, *x, d)?;
            }
            Op::Reshape { x, .. } => {
                let shape = self.g.ty(*x).shape.0.clone();
                let d = self.emit1(cx, Op::Reshape { x: dy, shape })?;
                self.contribute(cx, *x, d)?;
            }
            Op::Transpose { x, perm } => {
                let mut inverse = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                let d = self.emit1(
                    cx,
                    Op::Transpose {
                        x: dy,
                        perm: inverse,
                    },
                )?;
                self.contribute(cx, *x, d)?;
            }
            Op::Slice {
                x,
                dim: axis,
                start,
                end,
            } => {
                let shape = &self.g.ty(*x).shape;
                let size = shape.axis(*axis).map_or(end.size, |a| shape.size(a));
                let op = Op::Pad {
                    x: dy,
                    dim: *axis,
                    before: start.clone(),
                    after: Dim::new(size.saturating_sub(end.size)),
                };
                let d = self.emit1(cx, op)?;
                self.contribute(cx, *x, d)?;
            }
            Op::Split { x, dim: axis, .. } => {
                // The outputs without a gradient contribute zeros.
                let outputs = outputs.clone();
                let mut parts = Vec::with_capacity(outputs.len());
                for o in outputs {
                    let part = match self.grad[o] {
                        Some(d) => d,
                        None => {
                            let ty = self.g.ty(o);
                            let op = Op::Fill {
                                shape: ty.shape.0.clone(),
                                value: 0.0,
                                dtype: ty.dtype,
                            };
                            self.emit1(cx, op)?
                        }
                    };
                    parts.push(part);
                }
                let d = if parts.len() == 1 {
                    parts[0]
                } else {
                    self.emit1(
                        cx,
                        Op::Concat {
                            xs: parts,
                            dim: *axis,
                        },
                    )?
                };
                self.contribute(cx, *x, d)?;
            }
            Op::Concat { xs, dim: axis } => {
                if let [x] = xs[..] {
                    self.contribute(cx, x, dy)?;
                } else {
                    let sizes = xs
                        .iter()
                        .map(|&x| {
                            let shape = &self.g.ty(x).shape;
                            shape.axis(*axis).map(|a| shape.0[a].clone())
                        })
                        .collect::<Option<Vec<Dim>>>()
                        .ok_or_else(|| {
                            let error = OpError::Axis {
                                axis: *axis,
                                shape: self.g.ty(xs[0]).shape.clone(),
                            };
                            self.ill_typed(cx, error)
                        })?;
                    let op = Op::Split {
                        x: dy,
                        dim: *axis,
                        sizes,
                    };
                    let n = self.emit(cx, op)?;
                    let d = self.g.nodes[n].outputs.clone();
                    for (&x, d) in xs.iter().zip(d) {
                        if needs(self, x) {
                            self.contribute(cx, x, d)?;
                        }
                    }
                }
            }
            Op::Rotary {
                x,
                base,
                inverse,
                scaling,
            } => {
                // A rotation's transpose is the rotation by the negative angles.
                let op = Op::Rotary {
                    x: dy,
                    base: *base,
                    inverse: !inverse,
                    scaling: *scaling,
                };
                let d = self.emit1(cx, op)?;
                self.contribute(cx, *x, d)?;
            }
            Op::Dropout { x, p } => {
                let d = self.emit1(
                    cx,
                    Op::DropoutGrad {
                        dy,
                        forward: y,
                        p: *p,
                    },
                )?;
                self.contribute(cx, *x, d)?;
            }
            Op::CrossEntropy {
                logits,
                targets,
                shift,
                classes,
            } => {
                let op = Op::CrossEntropyGrad {
                    logits: *logits,
                    targets: *targets,
                    dloss: dy,
                    shift: *shift,
                    classes: classes.clone(),
                };
                let d = self.emit1(cx, op)?;
                self.contribute(cx, *logits, d)?;
            }

            // Collectives turn into their conjugates.
            Op::F { x, axis } => {
                // f: identity forward; each rank's gradient is a partial sum of the replicated
                // input's gradient, so the backward all-reduces.
                let d = self.emit1(cx, Op::AllReduce { x: dy, axis: *axis })?;
                self.contribute(cx, *x, d)?;
            }
            Op::G { x, .. } | Op::AllReduce { x, .. } => {
                // g: all-reduce forward; the gradient of a replicated output is already the
                // gradient of every rank's partial input.
                self.contribute(cx, *x, dy)?;
            }
            Op::AllGather {
                x,
                dim,
                axis,
                parts,
                partial_grad,
            } => {
                let (x, dim, axis, parts) = (*x, *dim, *axis, *parts);
                let op = if *partial_grad {
                    Op::ReduceScatter {
                        x: dy,
                        dim,
                        axis,
                        parts,
                    }
                } else {
                    Op::LocalSlice {
                        x: dy,
                        dim,
                        axis,
                        parts,
                    }
                };
                let d = self.emit1(cx, op)?;
                self.contribute(cx, x, d)?;
            }
            Op::ReduceScatter {
                x,
                dim,
                axis,
                parts,
            }
            | Op::LocalSlice {
                x,
                dim,
                axis,
                parts,
            } => {
                let op = Op::AllGather {
                    x: dy,
                    dim: *dim,
                    axis: *axis,
                    parts: *parts,
                    partial_grad: false,
                };
                let d = self.emit1(cx, op)?;
                self.contribute(cx, *x, d)?;
            }

            Op::SumTo { .. }
            | Op::Fill { .. }
            | Op::Pad { .. }
            | Op::ActGrad { .. }
            | Op::LayerNormGrad { .. }
            | Op::RmsNormGrad { .. }
            | Op::SoftmaxGrad { .. }
            | Op::EmbeddingGrad { .. }
            | Op::CrossEntropyGrad { .. }
            | Op::DropoutGrad { .. } => {
                return Err(AutodiffError::NoVjp {
                    node: self.g.nodes[cx.node].name.clone(),
                    op: op.mnemonic(),
                })
            }
        }
        Ok(())
    }

    fn negate(&mut self, cx: &mut Cx, d: ValueId) -> Result<ValueId, AutodiffError> {
        let factor = Factor::Const(-1.0);
        self.emit1(cx, Op::Scale { x: d, factor })
    }

    fn activation(
        &mut self,
        cx: &mut Cx,
        act: Activation,
        x: ValueId,
        dy: ValueId,
    ) -> Result<(), AutodiffError> {
        let d = self.emit1(cx, Op::ActGrad { act, x, dy })?;
        self.contribute(cx, x, d)
    }

    /// `y = op_a(A) · op_b(B)`: `dA' = dY · op_b(B)ᵀ` and `dB' = op_a(A)ᵀ · dY`, each transposed
    /// back when the operand was used transposed, then summed over broadcast batch axes.
    fn matmul(
        &mut self,
        cx: &mut Cx,
        a: ValueId,
        b: ValueId,
        ta: bool,
        tb: bool,
        dy: ValueId,
    ) -> Result<(), AutodiffError> {
        let mm = |a, b, transpose_a, transpose_b| Op::MatMul {
            a,
            b,
            transpose_a,
            transpose_b,
        };
        if self.needs[a] {
            let op = if ta {
                mm(b, dy, tb, true)
            } else {
                mm(dy, b, false, !tb)
            };
            let d = self.emit1(cx, op)?;
            let d = self.sum_to(cx, d, a)?;
            self.contribute(cx, a, d)?;
        }
        if self.needs[b] {
            let (ra, rb) = (self.g.ty(a).shape.rank(), self.g.ty(b).shape.rank());
            let d = if rb == 2 && ra > 2 && !ta {
                // A weight's gradient sums over every batch axis: with the batch axes merged
                // into the rows ([b, s, h] → [b·s, h]) that sum is the matmul's own contraction,
                // instead of a batched product materialising [b, h, n] followed by a SumTo.
                let a2 = self.rows(cx, a)?;
                let dy2 = self.rows(cx, dy)?;
                let op = if tb {
                    mm(dy2, a2, true, false)
                } else {
                    mm(a2, dy2, true, false)
                };
                self.emit1(cx, op)?
            } else {
                let op = if tb {
                    mm(dy, a, true, ta)
                } else {
                    mm(a, dy, !ta, false)
                };
                let d = self.emit1(cx, op)?;
                self.sum_to(cx, d, b)?
            };
            self.contribute(cx, b, d)?;
        }
        Ok(())
    }
}
