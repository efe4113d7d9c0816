//! The verifier: re-checks a graph's invariants from scratch. It runs after parsing and after
//! every transformation (partitioning, autodiff), so a pass that breaks the IR is caught at the
//! pass, with the offending node named, instead of in a runtime kernel.
//!
//! Invariants: program order lists every node exactly once; every input is defined before use;
//! each node's outputs point back to it and have exactly the types shape inference gives; value,
//! node and parameter names are unique; inputs, parameters and outputs refer to real values.

use crate::graph::{EntityRef, Graph, NodeId, ValueDef, ValueId};
use crate::infer::OpError;
use crate::shape::TensorType;
use std::collections::HashSet;
use thiserror::Error;

/// A broken invariant, naming the node or value at fault.
#[derive(Clone, Debug, PartialEq, Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum VerifyError {
    /// A node reads a value defined later in program order (or never).
    #[error("node `{node}` uses `{value}` before it is defined")]
    UseBeforeDef { node: String, value: String },
    /// A node refers to a value id that is not in the graph.
    #[error("node `{node}` refers to {value}, which is not a value of this graph")]
    Dangling { node: String, value: ValueId },
    /// The op cannot be applied to its inputs' types.
    #[error("node `{node}` ({op}): {error}")]
    Op {
        node: String,
        op: &'static str,
        error: Box<OpError>,
    },
    /// An output's recorded type is not what the op produces.
    #[error(
        "node `{node}`: output `{value}` is recorded as {found}, but {op} produces {expected}"
    )]
    TypeMismatch {
        node: String,
        op: &'static str,
        value: String,
        expected: Box<TensorType>,
        found: Box<TensorType>,
    },
    /// An output list of the wrong length or pointing at the wrong values.
    #[error("node `{node}`: its outputs do not match what {op} produces ({expected} output(s))")]
    Outputs {
        node: String,
        op: &'static str,
        expected: usize,
    },
    /// Program order does not list a node exactly once.
    #[error("node `{node}` appears {count} times in program order (must be once)")]
    Order { node: String, count: usize },
    /// Two things share a name.
    #[error("duplicate {what} name `{name}`")]
    DuplicateName { what: &'static str, name: String },
    /// A value's definition does not point back at it.
    #[error("value `{value}` says it is defined by {def:?}, which does not define it")]
    BadDef { value: String, def: ValueDef },
    /// A graph output or input that is not a proper value.
    #[error("graph {what} `{name}` is not a valid {what}")]
    BadBoundary { what: &'static str, name: String },
}

fn unique<'a>(what: &'static str, names: impl Iterator<Item = &'a str>) -> Result<(), VerifyError> {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(VerifyError::DuplicateName {
                what,
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// Checks every invariant of `g`; the first violation is returned.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    unique("value", g.values.values().map(|v| v.name.as_str()))?;
    unique("node", g.nodes.values().map(|n| n.name.as_str()))?;
    unique("parameter", g.params.values().map(|p| p.name.as_str()))?;

    // Every value's definition points back at it.
    for (v, data) in g.values.iter() {
        let ok = match data.def {
            ValueDef::Input => g.inputs.contains(&v),
            ValueDef::Param(p) => g.params.get(p).is_some_and(|p| p.value == v),
            ValueDef::Node { node, index } => g
                .nodes
                .get(node)
                .and_then(|n| n.outputs.get(index as usize))
                .is_some_and(|&o| o == v),
        };
        if !ok {
            return Err(VerifyError::BadDef {
                value: data.name.clone(),
                def: data.def,
            });
        }
    }
    for &v in &g.inputs {
        if g.values.get(v).is_none_or(|d| d.def != ValueDef::Input) {
            return Err(VerifyError::BadBoundary {
                what: "input",
                name: v.to_string(),
            });
        }
    }
    for p in g.params.values() {
        if g.values.get(p.value).is_none() {
            return Err(VerifyError::BadBoundary {
                what: "parameter",
                name: p.name.clone(),
            });
        }
    }

    // Program order: each node once, inputs defined first.
    let mut count = vec![0usize; g.nodes.len()];
    for &n in &g.order {
        match count.get_mut(n.index()) {
            Some(c) => *c += 1,
            None => {
                return Err(VerifyError::Order {
                    node: n.to_string(),
                    count: 1,
                })
            }
        }
    }
    if let Some((i, &c)) = count.iter().enumerate().find(|(_, &c)| c != 1) {
        return Err(VerifyError::Order {
            node: g.nodes[NodeId::new(i)].name.clone(),
            count: c,
        });
    }
    let mut defined: Vec<bool> = g
        .values
        .values()
        .map(|d| !matches!(d.def, ValueDef::Node { .. }))
        .collect();
    for &n in &g.order {
        let node = &g.nodes[n];
        for &v in node.op.inputs() {
            match defined.get(v.index()) {
                None => {
                    return Err(VerifyError::Dangling {
                        node: node.name.clone(),
                        value: v,
                    })
                }
                Some(false) => {
                    return Err(VerifyError::UseBeforeDef {
                        node: node.name.clone(),
                        value: g.values[v].name.clone(),
                    })
                }
                Some(true) => {}
            }
        }
        let op = node.op.mnemonic();
        let expected = g.infer_node(&node.op).map_err(|error| VerifyError::Op {
            node: node.name.clone(),
            op,
            error: Box::new(error),
        })?;
        if expected.len() != node.outputs.len() {
            return Err(VerifyError::Outputs {
                node: node.name.clone(),
                op,
                expected: expected.len(),
            });
        }
        for (&v, expected) in node.outputs.iter().zip(expected) {
            let data = &g.values[v];
            if data.ty != expected {
                return Err(VerifyError::TypeMismatch {
                    node: node.name.clone(),
                    op,
                    value: data.name.clone(),
                    expected: Box::new(expected),
                    found: Box::new(data.ty.clone()),
                });
            }
            defined[v.index()] = true;
        }
    }
    for (name, v) in &g.outputs {
        if g.values.get(*v).is_none() {
            return Err(VerifyError::BadBoundary {
                what: "output",
                name: name.clone(),
            });
        }
    }
    Ok(())
}
