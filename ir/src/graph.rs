//! The graph: values, nodes, parameters and scopes in typed arenas, with program order kept apart
//! from the node store (as cranelift does), so passes can reorder or insert without rebuilding.
//!
//! Everything downstream reads this: the partitioner rewrites it into a plan (the same IR, with
//! collectives), autodiff appends a backward pass, runtimes execute it in `order`. Names are what a
//! user sees in errors and in the visualizer: a node inside layer 3 of a repeat named `h` is called
//! `h.3.attn_scores`. [`Graph::add_node`] infers the output types, so a graph built through it is
//! well-typed by construction; [`crate::verify`] re-checks that after every transformation.

use crate::infer::{infer, OpError};
use crate::op::Op;
use crate::shape::TensorType;
use cranelift_entity::entity_impl;
pub use cranelift_entity::{EntityRef, PrimaryMap, SecondaryMap};
use serde::{Deserialize, Serialize};

/// A tensor value: a graph input, a parameter, or an output of a node.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(u32);
entity_impl!(ValueId, "v");

/// An operation in the graph.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(u32);
entity_impl!(NodeId, "n");

/// A trainable parameter.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ParamId(u32);
entity_impl!(ParamId, "p");

/// One instantiation of a block (a transformer layer, say): the unit the visualizer collapses.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ScopeId(u32);
entity_impl!(ScopeId, "s");

/// How a parameter's initial values are drawn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// Normal distribution with mean 0 and standard deviation `std`.
    Normal {
        #[allow(missing_docs)]
        std: f64,
    },
    /// All zeros (biases).
    Zeros,
    /// All ones (norm weights).
    Ones,
}

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum ValueDef {
    /// A graph input (token ids, labels).
    Input,
    /// A parameter.
    Param(ParamId),
    /// Output `index` of `node`.
    Node { node: NodeId, index: u32 },
}

/// A value's facts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueData {
    /// Unique name (`h.0.qkv`).
    pub name: String,
    /// Dtype and shape.
    pub ty: TensorType,
    /// What defines it.
    pub def: ValueDef,
}

/// A node's facts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeData {
    /// Unique name (`h.0.attn_scores`).
    pub name: String,
    /// The operation, over value ids.
    pub op: Op,
    /// The values it defines, one per op output.
    pub outputs: Vec<ValueId>,
    /// The block instance it belongs to, if any.
    pub scope: Option<ScopeId>,
}

/// A parameter's facts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamData {
    /// Unique name (`h.0.attn.c_attn.weight`).
    pub name: String,
    /// The value that holds it.
    pub value: ValueId,
    /// How it is initialised.
    pub init: Init,
    /// The block instance that declared it, if any.
    pub scope: Option<ScopeId>,
    /// The tensor-parallel layout the model file fixes for it, if any (the partitioner honours
    /// it and inserts whatever communication it needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<Pin>,
}

/// A parameter layout fixed by the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pin {
    /// Every rank holds all of it.
    Replicated,
    /// Rank `r` holds the `r`-th slice along this dimension.
    Split(usize),
}

/// A block instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScopeData {
    /// The instance's name prefix (`h.3`).
    pub name: String,
    /// The block it instantiates (`gpt_layer`).
    pub block: String,
    /// The enclosing instance.
    pub parent: Option<ScopeId>,
    /// Whether it is one of a `Repeat`'s copies (a layer).
    pub repeated: bool,
}

/// A dataflow graph of tensor ops.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// The model's name.
    pub name: String,
    /// The resolved named dimensions, in file order.
    pub dims: Vec<(String, u64)>,
    /// Every value.
    pub values: PrimaryMap<ValueId, ValueData>,
    /// Every node.
    pub nodes: PrimaryMap<NodeId, NodeData>,
    /// Program order: each node once, every input defined before use.
    pub order: Vec<NodeId>,
    /// Every parameter.
    pub params: PrimaryMap<ParamId, ParamData>,
    /// Graph inputs, in order.
    pub inputs: Vec<ValueId>,
    /// Named graph outputs (`loss`, `logits`).
    pub outputs: Vec<(String, ValueId)>,
    /// Block instances.
    pub scopes: PrimaryMap<ScopeId, ScopeData>,
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: impl Into<String>, ty: TensorType) -> ValueId {
        let v = self.values.push(ValueData {
            name: name.into(),
            ty,
            def: ValueDef::Input,
        });
        self.inputs.push(v);
        v
    }

    /// Adds a parameter and returns the value that holds it.
    pub fn add_param(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
        init: Init,
        scope: Option<ScopeId>,
    ) -> ValueId {
        let name = name.into();
        let value = self.values.next_key();
        let param = self.params.push(ParamData {
            name: name.clone(),
            value,
            init,
            scope,
            pin: None,
        });
        self.values.push(ValueData {
            name,
            ty,
            def: ValueDef::Param(param),
        })
    }

    /// Adds a block instance.
    pub fn add_scope(&mut self, data: ScopeData) -> ScopeId {
        self.scopes.push(data)
    }

    /// Infers the op's output types, appends the node to program order and returns its outputs,
    /// named by `output_names` (one per op output; a single output may be named like the node).
    pub fn add_node(
        &mut self,
        name: impl Into<String>,
        op: Op,
        output_names: Vec<String>,
        scope: Option<ScopeId>,
    ) -> Result<&[ValueId], OpError> {
        let types = self.infer_node(&op)?;
        if types.len() != output_names.len() {
            return Err(OpError::Attribute(format!(
                "{} produces {} outputs but {} names were given",
                op.mnemonic(),
                types.len(),
                output_names.len()
            )));
        }
        let node = self.nodes.next_key();
        let outputs = types
            .into_iter()
            .zip(output_names)
            .enumerate()
            .map(|(index, (ty, name))| {
                self.values.push(ValueData {
                    name,
                    ty,
                    def: ValueDef::Node {
                        node,
                        index: index as u32,
                    },
                })
            })
            .collect();
        self.nodes.push(NodeData {
            name: name.into(),
            op,
            outputs,
            scope,
        });
        self.order.push(node);
        Ok(&self.nodes[node].outputs)
    }

    /// The output types an op over this graph's values would have.
    pub fn infer_node(&self, op: &Op) -> Result<Vec<TensorType>, OpError> {
        let typed = op.try_map::<_, _, OpError, _, _>(
            |&v| {
                self.values
                    .get(v)
                    .map(|d| d.ty.clone())
                    .ok_or_else(|| OpError::Attribute(format!("value {v} does not exist")))
            },
            |d| Ok(d.clone()),
        )?;
        infer(&typed)
    }

    /// The type of a value.
    pub fn ty(&self, v: ValueId) -> &TensorType {
        &self.values[v].ty
    }

    /// A graph output by name.
    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
    }

    /// A value by name (linear search: for tests and tools, not for passes).
    pub fn value_named(&self, name: &str) -> Option<ValueId> {
        self.values
            .iter()
            .find(|(_, d)| d.name == name)
            .map(|(v, _)| v)
    }

    /// A node by name (linear search: for tests and tools, not for passes).
    pub fn node_named(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|(_, d)| d.name == name)
            .map(|(n, _)| n)
    }

    /// The block instances that are layers: copies made by `Repeat` that are not inside another
    /// repeated instance (a layer's repeated sub-blocks are part of the layer).
    pub fn layers(&self) -> impl Iterator<Item = (ScopeId, &ScopeData)> {
        self.scopes.iter().filter(|(_, s)| {
            let mut parent = s.parent;
            while let Some(p) = parent {
                if self.scopes[p].repeated {
                    return false;
                }
                parent = self.scopes[p].parent;
            }
            s.repeated
        })
    }
}
