//! Deterministic weights and batches: the same seed gives the same full tensors whatever the
//! mesh, so runs at different tp and dp start from identical weights and data (each rank then
//! takes its shard: [`crate::shard_params`]).
//!
//! Each parameter's values come from its own stream, seeded by the run's seed and the
//! parameter's name, so adding or reordering parameters does not change the others.

use crate::Tensor;
use ferrotron_ir::reference::splitmix64;
use ferrotron_ir::{Graph, Init, Op, ValueId};
use std::collections::HashMap;

/// A counter-based stream of uniform and normal numbers.
struct Stream {
    state: u64,
}

impl Stream {
    fn new(seed: u64, name: &str) -> Stream {
        let mut h = seed ^ 0x6a09_e667_f3bc_c908;
        for b in name.bytes() {
            h = splitmix64(h ^ u64::from(b));
        }
        Stream { state: h }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(1);
        splitmix64(self.state)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// `n` draws of `mean + std · N(0, 1)` as `f32`, both Box–Muller outputs of each pair used
    /// (initialising a large model is dominated by this).
    fn normals(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let (u, v) = (self.uniform(), self.uniform());
            let r = (-2.0 * u.ln()).sqrt();
            let (sin, cos) = (std::f64::consts::TAU * v).sin_cos();
            out.push((mean + std * r * cos) as f32);
            if out.len() < n {
                out.push((mean + std * r * sin) as f32);
            }
        }
        out
    }
}

fn sizes(g: &Graph, v: ValueId) -> Vec<usize> {
    g.ty(v).shape.sizes().iter().map(|&s| s as usize).collect()
}

/// Every parameter at its model shape, drawn as the model file says (`Normal(std)`, `Zeros`,
/// `Ones`), by name.
pub fn init_params(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    g.params
        .values()
        .map(|p| {
            let shape = sizes(g, p.value);
            let t = match p.init {
                Init::Zeros => Tensor::zeros(shape),
                Init::Ones => Tensor::full(shape, 1.0),
                Init::Normal { std } => {
                    let mut s = Stream::new(seed, &p.name);
                    let n = shape.iter().product();
                    let data = s.normals(n, 0.0, std);
                    Tensor {
                        shape,
                        data: data.into(),
                    }
                }
            };
            (p.name.clone(), t)
        })
        .collect()
}

/// Weights for checking a partitioned run rather than training: like [`init_params`], but norm
/// weights and biases are perturbed too (so a bias added on every rank, or a norm weight
/// applied to the wrong shard, shows) and matrices are larger (so activations are not all in
/// the linear part of their nonlinearities). A matrix a product contracts over `k` rows has
/// standard deviation `1.6 / √k` (0.2 at `k` = 64): each product grows its input's scale by
/// the same factor at any width, so a wide, deep model stays as well conditioned as a tiny one
/// and `f32` runs of it agree to the tolerances (with a fixed 0.2, GPT-2 small's activations
/// and logits grow until two `f32` summation orders differ past them).
pub fn test_params(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    // The rows each parameter is contracted over when it is a product's right operand.
    let mut contracted: HashMap<ValueId, u64> = HashMap::new();
    for &n in &g.order {
        if let Op::MatMul { b, transpose_b, .. } = &g.nodes[n].op {
            let shape = &g.ty(*b).shape;
            if shape.rank() >= 2 {
                let k = shape.size(shape.rank() - if *transpose_b { 1 } else { 2 });
                let e = contracted.entry(*b).or_insert(k);
                *e = (*e).max(k);
            }
        }
    }
    g.params
        .values()
        .map(|p| {
            let shape = sizes(g, p.value);
            let (mean, std) = match p.init {
                Init::Normal { .. } => match contracted.get(&p.value) {
                    Some(&k) => (0.0, 1.6 / (k.max(1) as f64).sqrt()),
                    None => (0.0, 0.2),
                },
                Init::Ones => (1.0, 0.1),
                Init::Zeros => (0.0, 0.1),
            };
            let mut s = Stream::new(seed, &p.name);
            let n = shape.iter().product();
            let data = s.normals(n, mean, std);
            (
                p.name.clone(),
                Tensor {
                    shape,
                    data: data.into(),
                },
            )
        })
        .collect()
}

/// A batch for every graph input: an integer input gets ids below every bound its uses set
/// (the rows of each table it indexes, the classes of each loss it is the target of); a float
/// input standard normal values.
pub fn random_batch(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut bound: HashMap<ValueId, u64> = HashMap::new();
    let mut limit = |v: ValueId, b: u64| {
        let e = bound.entry(v).or_insert(u64::MAX);
        *e = (*e).min(b);
    };
    for &n in &g.order {
        match &g.nodes[n].op {
            Op::Embedding { table, ids } => limit(*ids, g.ty(*table).shape.size(0)),
            Op::CrossEntropy {
                logits,
                targets,
                classes,
                ..
            } => {
                let ty = g.ty(*logits);
                let c = classes
                    .as_ref()
                    .map_or(ty.shape.size(ty.shape.rank() - 1), |c| c.size);
                limit(*targets, c);
            }
            _ => {}
        }
    }
    g.inputs
        .iter()
        .map(|&v| {
            let name = &g.values[v].name;
            let shape = sizes(g, v);
            let n: usize = shape.iter().product();
            let mut s = Stream::new(seed ^ 0xba7c, name);
            let data = if g.ty(v).dtype.is_int() {
                let b = bound.get(&v).copied().unwrap_or(1).clamp(1, 1 << 24);
                (0..n).map(|_| (s.next() % b) as f32).collect()
            } else {
                (0..n).map(|_| s.normal() as f32).collect()
            };
            (name.clone(), Tensor { shape, data })
        })
        .collect()
}
