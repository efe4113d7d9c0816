//! The model summary `ferrotron check` prints, as text or JSON: what a user wants to know about a
//! model before partitioning it.

use crate::count::{count_params, forward_flops, tokens_per_step, ParamKind};
use crate::Graph;
use serde::Serialize;
use std::fmt;

/// A named, typed graph input or output.
#[derive(Clone, Debug, Serialize)]
pub struct Port {
    /// The name the model file gives it.
    pub name: String,
    /// Its dtype (`"i64"`).
    pub dtype: String,
    /// Its sizes.
    pub shape: Vec<u64>,
    /// Its shape with dimension names (`"[batch=8, seq=1024]"`).
    pub shape_text: String,
}

/// Facts about a model.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The model's name.
    pub name: String,
    /// Total parameters, tied parameters once.
    pub parameters: u64,
    /// Parameters by kind (`embedding`, `matmul`, `bias`, `norm`, `other`).
    #[serde(serialize_with = "as_object")]
    pub parameters_by_kind: Vec<(ParamKind, u64)>,
    /// Number of layers (repeated block instances).
    pub layers: usize,
    /// The block the layers instantiate, if any.
    pub layer_block: Option<String>,
    /// Nodes in the expanded graph.
    pub nodes: usize,
    /// The resolved dimensions.
    #[serde(serialize_with = "as_object")]
    pub dims: Vec<(String, u64)>,
    /// Forward FLOPs per step, all ops.
    pub forward_flops_per_step: u128,
    /// Forward FLOPs per step in matmuls.
    pub forward_matmul_flops_per_step: u128,
    /// Tokens per step (elements of the token-id input).
    pub tokens_per_step: Option<u64>,
    /// Forward FLOPs per step over tokens per step (where the model has a token input).
    pub forward_flops_per_token: Option<u128>,
    /// Graph inputs.
    pub inputs: Vec<Port>,
    /// Graph outputs.
    pub outputs: Vec<Port>,
}

/// Name–value pairs as a JSON object, in their order.
fn as_object<K: Serialize, V: Serialize, S: serde::Serializer>(
    pairs: &[(K, V)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

impl Summary {
    /// Summarises a graph.
    pub fn of(g: &Graph) -> Summary {
        let params = count_params(g);
        let flops = forward_flops(g);
        let tokens = tokens_per_step(g);
        let port = |name: &str, v| {
            let ty = g.ty(v);
            Port {
                name: name.to_owned(),
                dtype: ty.dtype.to_string(),
                shape: ty.shape.sizes(),
                shape_text: ty.shape.to_string(),
            }
        };
        Summary {
            name: g.name.clone(),
            parameters: params.total,
            parameters_by_kind: params.by_kind,
            layers: g.layers().count(),
            layer_block: g.layers().next().map(|(_, s)| s.block.clone()),
            nodes: g.nodes.len(),
            dims: g.dims.clone(),
            forward_flops_per_step: flops.total(),
            forward_matmul_flops_per_step: flops.matmul,
            tokens_per_step: tokens,
            forward_flops_per_token: tokens.filter(|&t| t > 0).map(|t| flops.total() / t as u128),
            inputs: g
                .inputs
                .iter()
                .map(|&v| port(&g.values[v].name, v))
                .collect(),
            outputs: g.outputs.iter().map(|(n, v)| port(n, *v)).collect(),
        }
    }
}

/// `1234567` → `"1,234,567"`.
pub fn thousands(n: u128) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `2.5e12` → `"2.50 T"`.
pub fn si(n: f64) -> String {
    let units = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, unit) in units {
        if n >= scale {
            return format!("{:.2} {unit}", n / scale);
        }
    }
    format!("{n:.0} ")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model       {}", self.name)?;
        let dims: Vec<String> = self.dims.iter().map(|(n, v)| format!("{n}={v}")).collect();
        writeln!(f, "dims        {}", dims.join(" "))?;
        let kinds: Vec<String> = self
            .parameters_by_kind
            .iter()
            .map(|(k, n)| format!("{} {}", k.name(), thousands(*n as u128)))
            .collect();
        writeln!(
            f,
            "parameters  {}  ({})",
            thousands(self.parameters as u128),
            kinds.join(", ")
        )?;
        match &self.layer_block {
            Some(b) => writeln!(f, "layers      {} × {b}", self.layers)?,
            None => writeln!(f, "layers      0")?,
        }
        writeln!(f, "nodes       {}", self.nodes)?;
        write!(
            f,
            "forward     {}FLOP per step ({}FLOP in matmuls)",
            si(self.forward_flops_per_step as f64),
            si(self.forward_matmul_flops_per_step as f64)
        )?;
        if let (Some(per_token), Some(tokens)) =
            (self.forward_flops_per_token, self.tokens_per_step)
        {
            write!(
                f,
                ", {}FLOP per token over {tokens} tokens",
                si(per_token as f64)
            )?;
        }
        writeln!(f)?;
        for (label, ports) in [("input", &self.inputs), ("output", &self.outputs)] {
            for p in ports {
                writeln!(f, "{label:<11} {} {}{}", p.name, p.dtype, p.shape_text)?;
            }
        }
        Ok(())
    }
}
