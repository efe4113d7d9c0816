//! Evaluation without dropout, or at another rate: a model's graph with every `Dropout`'s
//! probability replaced before it is partitioned (`run --dropout`, `train --dropout`; `generate`
//! always at 0). At 0 the dropouts are taken out of the graph, so nothing draws masks or keeps
//! their outputs, and the loss does not depend on the dropout seed.

use crate::graph::{Graph, ValueDef, ValueId};
use crate::op::Op;
use crate::verify::verify;
use std::collections::HashMap;

/// The graph could not be rebuilt without its dropouts (a graph that does not verify).
#[derive(Debug, thiserror::Error)]
#[error("taking the dropouts out: {0}")]
pub struct DropoutError(String);

/// `g` with every dropout at probability `p` (the model file's rates overridden). At 0 the
/// dropouts are taken out: each reader of a dropout's output reads its input, so an evaluation
/// draws no masks and keeps nothing for them, and the loss does not depend on the dropout seed.
/// The rest of the graph (names, scopes, parameters, their order) is as loaded.
pub fn with_dropout(g: &Graph, p: f64) -> Result<Graph, DropoutError> {
    if p > 0.0 {
        let mut g = g.clone();
        for node in g.nodes.values_mut() {
            if let Op::Dropout { p: rate, .. } = &mut node.op {
                *rate = p;
            }
        }
        return Ok(g);
    }
    let mut out = Graph::new(g.name.clone());
    out.dims = g.dims.clone();
    out.scopes = g.scopes.clone();
    let mut to: HashMap<ValueId, ValueId> = HashMap::with_capacity(g.values.len());
    for &v in &g.inputs {
        let data = &g.values[v];
        to.insert(v, out.add_input(data.name.clone(), data.ty.clone()));
    }
    for param in g.params.values() {
        let v = out.add_param(
            param.name.clone(),
            g.ty(param.value).clone(),
            param.init.clone(),
            param.scope,
        );
        if let ValueDef::Param(id) = out.values[v].def {
            out.params[id].pin = param.pin;
        }
        to.insert(param.value, v);
    }
    let mapped = |to: &HashMap<ValueId, ValueId>, v: &ValueId| {
        to.get(v).copied().ok_or_else(|| {
            DropoutError(format!(
                "`{}` is read before it is defined",
                g.values[*v].name
            ))
        })
    };
    for &n in &g.order {
        let node = &g.nodes[n];
        if let Op::Dropout { x, .. } = node.op {
            let x = mapped(&to, &x)?;
            to.insert(node.outputs[0], x);
            continue;
        }
        let op = node.op.try_map(|v| mapped(&to, v), |d| Ok(d.clone()))?;
        let names = node
            .outputs
            .iter()
            .map(|&v| g.values[v].name.clone())
            .collect();
        let outputs = out
            .add_node(node.name.clone(), op, names, node.scope)
            .map_err(|e| DropoutError(format!("node `{}`: {e}", node.name)))?
            .to_vec();
        to.extend(node.outputs.iter().copied().zip(outputs));
    }
    out.outputs = g
        .outputs
        .iter()
        .map(|(name, v)| Ok((name.clone(), mapped(&to, v)?)))
        .collect::<Result<_, DropoutError>>()?;
    verify(&out).map_err(|e| DropoutError(format!("{} without dropout: {e}", g.name)))?;
    Ok(out)
}
