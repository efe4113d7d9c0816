//! The model file's syntax tree, as serde reads it from RON. A file is one `Model(...)`:
//!
//! ```ron
//! Model(
//!     name: "tiny-gpt",
//!     dims: { "hidden": 64, "heads": 4, "head_dim": "hidden / heads" },
//!     inputs: { "tokens": Input(shape: ["batch", "seq"], dtype: I64) },
//!     params: { "wte": Param(shape: ["vocab", "hidden"], init: Normal(std: 0.02)) },
//!     blocks: { "layer": Block(inputs: ["x"], params: {...}, body: {...}, outputs: ["y"]) },
//!     body: {
//!         "x0": Embedding(table: "wte", ids: "tokens"),
//!         "h": Repeat(block: "layer", times: "layers", inputs: ["x0"]),
//!         "q, k, v": Split(x: "qkv", dim: -1, sizes: ["hidden", "hidden", "hidden"]),
//!     },
//!     outputs: ["loss"],
//! )
//! ```
//!
//! A body statement is an [`Op`] (over names and dimension expressions) or the application of a
//! block (`Call`, `Repeat`). Bodies are maps from output names to statements; statements may appear
//! in any order (the lowering sorts them by their data dependencies). Everything here is checked
//! while parsing where that is possible, so the RON parser's position points at the mistake.

use super::expr::DimExpr;
use crate::graph::Init;
use crate::op::{Op, OP_NAMES};
use crate::DType;
use serde::de::{self, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::fmt;
use std::marker::PhantomData;

/// A whole model file.
#[derive(Debug, Deserialize)]
#[serde(rename = "Model", deny_unknown_fields)]
pub struct ModelFile {
    /// The model's name.
    pub name: String,
    /// Free text shown by `check`.
    #[serde(default)]
    pub description: Option<String>,
    /// Another model file (relative to this one) whose graph this model reuses: a model that
    /// extends another sets only its name, description and the dimensions it changes.
    #[serde(default)]
    pub extends: Option<String>,
    /// Named dimensions: integers or expressions over other dimensions.
    #[serde(default)]
    pub dims: Entries<DimExpr>,
    /// Graph inputs.
    #[serde(default)]
    pub inputs: Entries<InputSpec>,
    /// Top-level parameters.
    #[serde(default)]
    pub params: Entries<ParamSpec>,
    /// Reusable blocks.
    #[serde(default)]
    pub blocks: Entries<BlockSpec>,
    /// The top-level statements.
    #[serde(default)]
    pub body: Entries<Stmt>,
    /// Names of the values the model returns.
    #[serde(default)]
    pub outputs: Vec<String>,
}

/// A graph input.
#[derive(Debug, Deserialize)]
#[serde(rename = "Input", deny_unknown_fields)]
pub struct InputSpec {
    /// Its dimensions, each a number or an expression over the named dimensions.
    pub shape: Vec<DimExpr>,
    /// Its element type (`I64` for token ids).
    pub dtype: DType,
}

/// A parameter declaration.
#[derive(Debug, Deserialize)]
#[serde(rename = "Param", deny_unknown_fields)]
pub struct ParamSpec {
    /// Its dimensions, each a number or an expression over the named dimensions.
    pub shape: Vec<DimExpr>,
    /// How it is initialised.
    pub init: Init,
    /// Its dtype (default f32).
    #[serde(default)]
    pub dtype: DType,
    /// A tensor-parallel layout to impose instead of the partitioner's choice:
    /// `layout: Replicated` or `layout: Split(1)`.
    #[serde(default, deserialize_with = "some_pin")]
    pub layout: Option<crate::graph::Pin>,
}

fn some_pin<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<crate::graph::Pin>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// A reusable block: a sub-graph with inputs, its own parameters and outputs.
#[derive(Debug, Deserialize)]
#[serde(rename = "Block", deny_unknown_fields)]
pub struct BlockSpec {
    /// Names its body uses for the values passed in.
    pub inputs: Vec<String>,
    /// Parameters, instantiated once per application under the application's prefix.
    #[serde(default)]
    pub params: Entries<ParamSpec>,
    /// The block's statements.
    pub body: Entries<Stmt>,
    /// Names of the values it returns.
    pub outputs: Vec<String>,
}

/// One statement of a body.
#[derive(Debug)]
pub enum Stmt {
    /// An op over named values.
    Op(Op<String, DimExpr>),
    /// A block applied once or repeated.
    Apply(Apply),
}

/// Application of a block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum Apply {
    /// `Call(block: "mlp", inputs: ["x"])`: one application; parameters are named `NAME.param`
    /// (or `PREFIX.param`).
    Call {
        block: String,
        inputs: Vec<String>,
        #[serde(default)]
        prefix: Option<String>,
    },
    /// `Repeat(block: "layer", times: "layers", inputs: ["x"])`: `times` applications, each
    /// feeding the next (so the block's inputs and outputs must match); the copies are the
    /// model's layers, and parameters are named `NAME.i.param` (or `PREFIX.i.param`).
    Repeat {
        block: String,
        times: DimExpr,
        inputs: Vec<String>,
        #[serde(default)]
        prefix: Option<String>,
    },
}

impl Apply {
    /// The applied block's name.
    pub fn block(&self) -> &str {
        match self {
            Apply::Call { block, .. } | Apply::Repeat { block, .. } => block,
        }
    }

    /// The values passed in.
    pub fn inputs(&self) -> &[String] {
        match self {
            Apply::Call { inputs, .. } | Apply::Repeat { inputs, .. } => inputs,
        }
    }
}

impl Stmt {
    /// The names of values the statement reads.
    pub fn reads(&self) -> Vec<&str> {
        match self {
            Stmt::Op(op) => op.inputs().into_iter().map(String::as_str).collect(),
            Stmt::Apply(a) => a.inputs().iter().map(String::as_str).collect(),
        }
    }
}

/// Statement names accepted besides the ops.
const APPLY_NAMES: &[&str] = &["Call", "Repeat"];

impl<'de> Deserialize<'de> for Stmt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Stmt, D::Error> {
        d.deserialize_enum("Stmt", OP_NAMES, StmtVisitor)
    }
}

struct StmtVisitor;

impl<'de> Visitor<'de> for StmtVisitor {
    type Value = Stmt;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(
            "an op such as `MatMul(a: \"x\", b: \"w\")`, or `Call(...)` / `Repeat(...)` of a block",
        )
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Stmt, A::Error> {
        let (Tag(tag), variant): (Tag, A::Variant) = data.variant()?;
        let replay = Replay {
            tag: tag.clone(),
            variant,
        };
        if APPLY_NAMES.contains(&tag.as_str()) {
            Apply::deserialize(replay).map(Stmt::Apply)
        } else if OP_NAMES.contains(&tag.as_str()) {
            Op::deserialize(replay).map(Stmt::Op)
        } else {
            let known = OP_NAMES.iter().chain(APPLY_NAMES);
            let suggestion = closest(&tag, known.clone().copied());
            Err(de::Error::custom(format!(
                "unknown op `{tag}`{}; known ops: {}",
                super::expr::suggest(&suggestion),
                known.copied().collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// The candidate closest to `name` by edit distance, if any is close enough to be a likely typo.
pub fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|&(d, c)| d <= 2.max(c.len() / 3) && d < c.len().max(name.len()))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c.to_owned())
}

/// An enum variant's name, read as an identifier (RON reads a `String` only from quotes).
struct Tag(String);

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tag, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Tag;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an op name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Tag, E> {
                Ok(Tag(v.to_owned()))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Hands an enum's already-read variant name back to a derived `Deserialize`, so one statement
/// can be either an [`Op`] or an [`Apply`] without serde's untagged buffering (which RON's enums
/// do not survive) and with the RON parser's positions kept.
struct Replay<A> {
    tag: String,
    variant: A,
}

impl<'de, A: de::VariantAccess<'de>> Deserializer<'de> for Replay<A> {
    type Error = A::Error;

    fn deserialize_any<W: Visitor<'de>>(self, visitor: W) -> Result<W::Value, A::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, A: de::VariantAccess<'de>> EnumAccess<'de> for Replay<A> {
    type Error = A::Error;
    type Variant = A;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, A), A::Error> {
        let tag = seed.deserialize(self.tag.into_deserializer())?;
        Ok((tag, self.variant))
    }
}

/// A RON map read in file order, rejecting duplicate names (a plain map would silently keep the
/// last one).
#[derive(Debug)]
pub struct Entries<T>(pub Vec<(String, T)>);

impl<T> Default for Entries<T> {
    fn default() -> Self {
        Entries(Vec::new())
    }
}

impl<T> Entries<T> {
    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.0.iter().map(|(n, _)| n.as_str())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entries<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Entries<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from names to entries, `{ \"name\": ..., }`")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Entries<T>, M::Error> {
                let mut out: Vec<(String, T)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !seen.insert(name.clone()) {
                        return Err(de::Error::custom(format!("duplicate name `{name}`")));
                    }
                    let value = map.next_value()?;
                    out.push((name, value));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}
