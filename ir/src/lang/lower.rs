//! From syntax tree to graph: resolve the dimensions, declare inputs and parameters, expand every
//! `Call` and `Repeat` into fresh copies of the block (parameters named `PREFIX.i.param`), order
//! each body's statements by their data dependencies (statements may be written in any order; a
//! cycle is an error naming its members), add the nodes through [`Graph::add_node`] so every shape
//! is inferred as it is created, then verify the whole.

use super::expr::{DimExpr, EvalError};
use super::locate::locate;
use super::syntax::{closest, Apply, BlockSpec, Entries, ModelFile, ParamSpec, Stmt};
use super::{ErrorKind, LoadOptions, ModelError};
use crate::graph::{Graph, ScopeData, ScopeId, ValueId};
use crate::shape::{Dim, Shape, TensorType};
use crate::verify::verify;
use crate::DType;
use std::collections::HashMap;

type Env = HashMap<String, ValueId>;

/// Where a body is written: the top level, or inside a named block.
#[derive(Clone, Copy)]
enum Loc<'a> {
    Top,
    Block(&'a str),
}

impl<'a> Loc<'a> {
    /// The locator path of `key` in `section` (`body`, `params`, `outputs`, ...).
    fn path(self, section: &'a str, key: &'a str) -> Vec<&'a str> {
        match self {
            Loc::Top => vec![section, key],
            Loc::Block(b) => vec!["blocks", b, section, key],
        }
    }
}

struct Lowerer<'a> {
    file: &'a ModelFile,
    src: &'a str,
    file_name: &'a str,
    opts: &'a LoadOptions,
    dims: HashMap<String, u64>,
    graph: Graph,
    /// Blocks being expanded, outermost first, to reject a block that applies itself.
    call_stack: Vec<&'a str>,
}

pub(super) fn lower(
    file: &ModelFile,
    src: &str,
    file_name: &str,
    opts: &LoadOptions,
) -> Result<Graph, ModelError> {
    let mut l = Lowerer {
        file,
        src,
        file_name,
        opts,
        dims: HashMap::new(),
        graph: Graph::new(file.name.clone()),
        call_stack: Vec::new(),
    };
    l.lower_model().map_err(|mut e| {
        // An override is the likeliest cause of a shape error in a file that checks without it.
        if !opts.overrides.is_empty() && !matches!(*e.kind, ErrorKind::UnknownOverride { .. }) {
            let list: Vec<String> = opts
                .overrides
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            e.note = Some(format!("with --dim {}", list.join(" --dim ")));
        }
        e
    })?;
    Ok(l.graph)
}

fn split_key(key: &str) -> Vec<&str> {
    key.split(',').map(str::trim).collect()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Statement indices in an order where each comes after those it reads, keeping file order where
/// the dependencies allow; on a cycle, its members in order.
fn topo_order(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    const NEW: u8 = 0;
    const OPEN: u8 = 1;
    const DONE: u8 = 2;
    let mut state = vec![NEW; deps.len()];
    let mut order = Vec::with_capacity(deps.len());
    for root in 0..deps.len() {
        if state[root] != NEW {
            continue;
        }
        state[root] = OPEN;
        let mut stack = vec![(root, 0usize)];
        while let Some((v, next)) = stack.last_mut() {
            let v = *v;
            if let Some(&d) = deps[v].get(*next) {
                *next += 1;
                match state[d] {
                    NEW => {
                        state[d] = OPEN;
                        stack.push((d, 0));
                    }
                    OPEN => {
                        let start = stack.iter().position(|&(s, _)| s == d).unwrap_or(0);
                        let mut cycle: Vec<usize> =
                            stack[start..].iter().map(|&(s, _)| s).collect();
                        cycle.push(d);
                        return Err(cycle);
                    }
                    _ => {}
                }
            } else {
                state[v] = DONE;
                order.push(v);
                stack.pop();
            }
        }
    }
    Ok(order)
}

impl<'a> Lowerer<'a> {
    fn error(&self, path: &[&str], node: Option<String>, kind: ErrorKind) -> ModelError {
        ModelError {
            file: self.file_name.to_owned(),
            pos: locate(self.src, path),
            node,
            kind: Box::new(kind),
            note: None,
        }
    }

    fn lower_model(&mut self) -> Result<(), ModelError> {
        let file = self.file;
        self.resolve_dims()?;
        let mut env = Env::new();
        for (name, spec) in &file.inputs.0 {
            let path = ["inputs", name.as_str()];
            self.check_new_name(&env, name, &path)?;
            let ty = self.tensor_type(&spec.shape, spec.dtype, &path, name)?;
            let v = self.graph.add_input(name.clone(), ty);
            env.insert(name.clone(), v);
        }
        for (name, spec) in &file.params.0 {
            let path = ["params", name.as_str()];
            self.check_new_name(&env, name, &path)?;
            let v = self.add_param(name, spec, "", None, &path)?;
            env.insert(name.clone(), v);
        }
        self.lower_body(&file.body, &mut env, "", None, Loc::Top)?;
        for name in &file.outputs {
            let v = self.lookup_output(&env, name, Loc::Top)?;
            self.graph.outputs.push((name.clone(), v));
        }
        verify(&self.graph).map_err(|e| match e {
            // A written name that equals one a block expansion generates (`h.0.y` beside a
            // repeat `h`) is the user's to fix, not a front-end bug.
            crate::VerifyError::DuplicateName { name, .. } => self.error(
                &["body", &name],
                Some(name.clone()),
                ErrorKind::Duplicate(name.clone()),
            ),
            e => self.error(&[], None, ErrorKind::Verify(e)),
        })
    }

    fn resolve_dims(&mut self) -> Result<(), ModelError> {
        let file = self.file;
        for (name, _) in &self.opts.overrides {
            if file.dims.get(name).is_none() {
                return Err(self.error(
                    &[],
                    None,
                    ErrorKind::UnknownOverride {
                        name: name.clone(),
                        suggestion: closest(name, file.dims.names()),
                        known: file.dims.names().collect::<Vec<_>>().join(", "),
                    },
                ));
            }
        }
        let mut stack = Vec::new();
        for (name, _) in &file.dims.0 {
            self.resolve_dim(name, &mut stack)?;
        }
        self.graph.dims = file
            .dims
            .0
            .iter()
            .map(|(n, _)| (n.clone(), self.dims[n]))
            .collect();
        Ok(())
    }

    fn resolve_dim(&mut self, name: &'a str, stack: &mut Vec<&'a str>) -> Result<u64, ModelError> {
        if let Some(&v) = self.dims.get(name) {
            return Ok(v);
        }
        let path = ["dims", name];
        let node = Some(name.to_owned());
        if let Some(&(_, v)) = self.opts.overrides.iter().find(|(n, _)| n == name) {
            self.dims.insert(name.to_owned(), v);
            return Ok(v);
        }
        if let Some(start) = stack.iter().position(|&s| s == name) {
            let mut cycle: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(name.to_owned());
            return Err(self.error(&path, node, ErrorKind::Dim(EvalError::Cycle(cycle))));
        }
        let file = self.file;
        let Some(expr) = file.dims.get(name) else {
            return Err(self.unknown_dim(&path, node, name));
        };
        stack.push(name);
        for dep in expr.names() {
            if file.dims.get(dep).is_none() {
                return Err(self.unknown_dim(&path, node, dep));
            }
            self.resolve_dim(dep, stack)?;
        }
        stack.pop();
        let dims = &self.dims;
        let value = expr
            .eval(&mut |n| Ok(dims[n]))
            .map_err(|e| self.error(&path, node, ErrorKind::Dim(e)))?;
        self.dims.insert(name.to_owned(), value);
        Ok(value)
    }

    fn unknown_dim(&self, path: &[&str], node: Option<String>, name: &str) -> ModelError {
        self.error(
            path,
            node,
            ErrorKind::Dim(EvalError::UnknownDim {
                name: name.to_owned(),
                suggestion: closest(name, self.file.dims.names()),
            }),
        )
    }

    /// Evaluates a dimension expression, keeping its name (or its text) on the dimension.
    fn eval_dim(&self, expr: &DimExpr) -> Result<Dim, EvalError> {
        let size = expr.eval(&mut |n| {
            self.dims
                .get(n)
                .copied()
                .ok_or_else(|| EvalError::UnknownDim {
                    name: n.to_owned(),
                    suggestion: closest(n, self.file.dims.names()),
                })
        })?;
        Ok(if expr.is_literal() {
            Dim::new(size)
        } else {
            Dim::named(size, expr.text.as_str())
        })
    }

    fn tensor_type(
        &self,
        shape: &[DimExpr],
        dtype: DType,
        path: &[&str],
        node: &str,
    ) -> Result<TensorType, ModelError> {
        let dims = shape
            .iter()
            .map(|e| self.eval_dim(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.error(path, Some(node.to_owned()), ErrorKind::Dim(e)))?;
        let shape = Shape(dims);
        if shape.numel().is_none() {
            return Err(self.error(
                path,
                Some(node.to_owned()),
                ErrorKind::Op {
                    op: "shape",
                    error: crate::OpError::Overflow(shape),
                },
            ));
        }
        Ok(TensorType::new(dtype, shape))
    }

    fn add_param(
        &mut self,
        name: &str,
        spec: &ParamSpec,
        prefix: &str,
        scope: Option<ScopeId>,
        path: &[&str],
    ) -> Result<ValueId, ModelError> {
        let full = format!("{prefix}{name}");
        let ty = self.tensor_type(&spec.shape, spec.dtype, path, &full)?;
        if !spec.dtype.is_float() {
            return Err(self.error(
                path,
                Some(full),
                ErrorKind::Syntax(format!(
                    "parameters must have a float dtype, found {}",
                    spec.dtype
                )),
            ));
        }
        if let crate::Init::Normal { std } = spec.init {
            if !(std.is_finite() && std >= 0.0) {
                return Err(self.error(
                    path,
                    Some(full),
                    ErrorKind::Syntax(format!("Normal std {std} must be a non-negative number")),
                ));
            }
        }
        if let Some(crate::graph::Pin::Split(d)) = spec.layout {
            if d >= ty.shape.rank() {
                return Err(self.error(
                    path,
                    Some(full),
                    ErrorKind::Syntax(format!(
                        "layout Split({d}): the parameter has rank {}, so Split(0) to Split({}) \
                         or Replicated",
                        ty.shape.rank(),
                        ty.shape.rank().saturating_sub(1)
                    )),
                ));
            }
        }
        let value = self.graph.add_param(full, ty, spec.init.clone(), scope);
        if let crate::ValueDef::Param(p) = self.graph.values[value].def {
            self.graph.params[p].pin = spec.layout;
        }
        Ok(value)
    }

    fn check_new_name(&self, env: &Env, name: &str, path: &[&str]) -> Result<(), ModelError> {
        if !valid_name(name) {
            return Err(self.error(path, None, ErrorKind::BadName(name.to_owned())));
        }
        if env.contains_key(name) {
            return Err(self.error(
                path,
                Some(name.to_owned()),
                ErrorKind::Duplicate(name.to_owned()),
            ));
        }
        Ok(())
    }

    fn lookup_output(&self, env: &Env, name: &str, loc: Loc) -> Result<ValueId, ModelError> {
        env.get(name).copied().ok_or_else(|| {
            let path = match loc {
                Loc::Top => vec!["outputs"],
                Loc::Block(b) => vec!["blocks", b, "outputs"],
            };
            self.error(
                &path,
                None,
                ErrorKind::Undefined {
                    name: name.to_owned(),
                    suggestion: closest(name, env.keys().map(String::as_str)),
                },
            )
        })
    }

    fn lower_body(
        &mut self,
        body: &'a Entries<Stmt>,
        env: &mut Env,
        prefix: &str,
        scope: Option<ScopeId>,
        loc: Loc<'a>,
    ) -> Result<(), ModelError> {
        // Which statement defines each name.
        let mut produced: HashMap<&str, usize> = HashMap::new();
        let mut outs: Vec<Vec<&str>> = Vec::with_capacity(body.0.len());
        for (i, (key, _)) in body.0.iter().enumerate() {
            let path = loc.path("body", key);
            let names = split_key(key);
            for &n in &names {
                self.check_new_name(env, n, &path)?;
                if produced.insert(n, i).is_some() {
                    return Err(self.error(
                        &path,
                        Some(format!("{prefix}{n}")),
                        ErrorKind::Duplicate(n.to_owned()),
                    ));
                }
            }
            outs.push(names);
        }
        let mut deps = Vec::with_capacity(body.0.len());
        for (key, stmt) in &body.0 {
            let mut d = Vec::new();
            for name in stmt.reads() {
                if let Some(&j) = produced.get(name) {
                    d.push(j);
                } else if !env.contains_key(name) {
                    let candidates = env
                        .keys()
                        .map(String::as_str)
                        .chain(produced.keys().copied());
                    return Err(self.error(
                        &loc.path("body", key),
                        Some(format!("{prefix}{}", key.replace(' ', ""))),
                        ErrorKind::Undefined {
                            name: name.to_owned(),
                            suggestion: closest(name, candidates),
                        },
                    ));
                }
            }
            deps.push(d);
        }
        let order = topo_order(&deps).map_err(|cycle| {
            let names = cycle
                .iter()
                .map(|&i| format!("{prefix}{}", outs[i][0]))
                .collect();
            let first = &body.0[cycle[0]].0;
            self.error(&loc.path("body", first), None, ErrorKind::Cycle(names))
        })?;
        for i in order {
            let (key, stmt) = &body.0[i];
            let path = loc.path("body", key);
            let values = match stmt {
                Stmt::Op(op) => self.lower_op(op, &outs[i], env, prefix, scope, &path)?,
                Stmt::Apply(apply) => {
                    self.lower_apply(apply, &outs[i], env, prefix, scope, &path)?
                }
            };
            for (&name, v) in outs[i].iter().zip(values) {
                env.insert(name.to_owned(), v);
            }
        }
        Ok(())
    }

    fn lower_op(
        &mut self,
        op: &crate::Op<String, DimExpr>,
        outs: &[&str],
        env: &Env,
        prefix: &str,
        scope: Option<ScopeId>,
        path: &[&str],
    ) -> Result<Vec<ValueId>, ModelError> {
        let node_name = format!("{prefix}{}", outs.join(","));
        let located = |l: &Self, kind| l.error(path, Some(node_name.clone()), kind);
        if op.num_outputs() != outs.len() {
            return Err(located(
                self,
                ErrorKind::OutputCount {
                    what: op.mnemonic().to_owned(),
                    expected: op.num_outputs(),
                    found: outs.len(),
                },
            ));
        }
        let resolved = op
            .try_map(|name| Ok(env[name.as_str()]), |e| self.eval_dim(e))
            .map_err(|e| located(self, ErrorKind::Dim(e)))?;
        let value_names = outs.iter().map(|o| format!("{prefix}{o}")).collect();
        let mnemonic = op.mnemonic();
        let values = self
            .graph
            .add_node(node_name.clone(), resolved, value_names, scope)
            .map(<[ValueId]>::to_vec)
            .map_err(|error| ErrorKind::Op {
                op: mnemonic,
                error,
            });
        let values = values.map_err(|kind| located(self, kind))?;
        if self.graph.nodes.len() > self.opts.max_nodes {
            return Err(located(self, ErrorKind::TooLarge(self.opts.max_nodes)));
        }
        Ok(values)
    }

    fn lower_apply(
        &mut self,
        apply: &'a Apply,
        outs: &[&str],
        env: &Env,
        prefix: &str,
        scope: Option<ScopeId>,
        path: &[&str],
    ) -> Result<Vec<ValueId>, ModelError> {
        let file = self.file;
        let block_name = apply.block();
        let node_name = format!("{prefix}{}", outs.join(","));
        let located = |l: &Self, kind| l.error(path, Some(node_name.clone()), kind);
        let Some(block) = file.blocks.get(block_name) else {
            return Err(located(
                self,
                ErrorKind::UnknownBlock {
                    name: block_name.to_owned(),
                    suggestion: closest(block_name, file.blocks.names()),
                },
            ));
        };
        if self.call_stack.contains(&block_name) {
            let mut chain: Vec<&str> = self.call_stack.clone();
            chain.push(block_name);
            return Err(located(
                self,
                ErrorKind::Recursive(block_name.to_owned(), chain.join(" → ")),
            ));
        }
        if apply.inputs().len() != block.inputs.len() {
            return Err(located(
                self,
                ErrorKind::BlockInputs {
                    block: block_name.to_owned(),
                    expected: block.inputs.len(),
                    found: apply.inputs().len(),
                },
            ));
        }
        if outs.len() != block.outputs.len() {
            return Err(located(
                self,
                ErrorKind::OutputCount {
                    what: format!("block `{block_name}`"),
                    expected: block.outputs.len(),
                    found: outs.len(),
                },
            ));
        }
        let args: Vec<ValueId> = apply.inputs().iter().map(|n| env[n.as_str()]).collect();
        match apply {
            Apply::Call { prefix: p, .. } => {
                let name = format!("{prefix}{}", p.as_deref().unwrap_or(outs[0]));
                let scope = self.graph.add_scope(ScopeData {
                    name: name.clone(),
                    block: block_name.to_owned(),
                    parent: scope,
                    repeated: false,
                });
                self.instantiate(block_name, block, &format!("{name}."), args, scope)
            }
            Apply::Repeat {
                times, prefix: p, ..
            } => {
                let times = self
                    .eval_dim(times)
                    .map_err(|e| located(self, ErrorKind::Dim(e)))?
                    .size;
                if block.inputs.len() != block.outputs.len() {
                    return Err(located(
                        self,
                        ErrorKind::Repeat {
                            block: block_name.to_owned(),
                            why: format!(
                                "it takes {} input(s) but returns {} output(s), so one copy cannot feed the next",
                                block.inputs.len(),
                                block.outputs.len()
                            ),
                        },
                    ));
                }
                let base = format!("{prefix}{}", p.as_deref().unwrap_or(outs[0]));
                let mut carry = args;
                for i in 0..times {
                    let name = format!("{base}.{i}");
                    let s = self.graph.add_scope(ScopeData {
                        name: name.clone(),
                        block: block_name.to_owned(),
                        parent: scope,
                        repeated: true,
                    });
                    let next =
                        self.instantiate(block_name, block, &format!("{name}."), carry.clone(), s)?;
                    if i == 0 {
                        self.check_repeat_types(
                            block_name, block, &carry, &next, path, &node_name,
                        )?;
                    }
                    carry = next;
                }
                Ok(carry)
            }
        }
    }

    fn check_repeat_types(
        &self,
        block_name: &str,
        block: &BlockSpec,
        inputs: &[ValueId],
        outputs: &[ValueId],
        path: &[&str],
        node_name: &str,
    ) -> Result<(), ModelError> {
        for (j, (&i, &o)) in inputs.iter().zip(outputs).enumerate() {
            let (ti, to) = (self.graph.ty(i), self.graph.ty(o));
            if ti != to {
                return Err(self.error(
                    path,
                    Some(node_name.to_owned()),
                    ErrorKind::Repeat {
                        block: block_name.to_owned(),
                        why: format!(
                            "its output `{}` is {to} but the input `{}` it feeds is {ti}",
                            block.outputs[j], block.inputs[j]
                        ),
                    },
                ));
            }
        }
        Ok(())
    }

    fn instantiate(
        &mut self,
        block_name: &'a str,
        block: &'a BlockSpec,
        prefix: &str,
        args: Vec<ValueId>,
        scope: ScopeId,
    ) -> Result<Vec<ValueId>, ModelError> {
        self.call_stack.push(block_name);
        let loc = Loc::Block(block_name);
        let mut env = Env::new();
        for (name, v) in block.inputs.iter().zip(args) {
            self.check_new_name(&env, name, &["blocks", block_name, "inputs"])?;
            env.insert(name.clone(), v);
        }
        for (name, spec) in &block.params.0 {
            let path = loc.path("params", name);
            self.check_new_name(&env, name, &path)?;
            let v = self.add_param(name, spec, prefix, Some(scope), &path)?;
            env.insert(name.clone(), v);
        }
        self.lower_body(&block.body, &mut env, prefix, Some(scope), loc)?;
        let outputs = block
            .outputs
            .iter()
            .map(|name| self.lookup_output(&env, name, loc))
            .collect();
        self.call_stack.pop();
        outputs
    }
}
