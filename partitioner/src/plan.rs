//! The plan: what the partitioner produces and the runtimes execute.
//!
//! One SPMD graph — forward then backward, with shard-local shapes, a layout on both mesh axes for
//! every value, and the collectives as ordinary nodes — plus, for each parameter, how rank `r`
//! instantiates it: which slice of the full (possibly vocabulary-padded) tensor it holds. The
//! graph is the same at 8 ranks or 4,096; only the shard index differs per rank. A plan
//! serialises to RON and reads back unchanged ([`Plan::to_ron`], [`Plan::from_ron`]).

use crate::check::{verify_plan, PlanError};
use crate::layout::{Layout, Mesh, MeshLayout};
use ferrotron_ir::graph::SecondaryMap;
use ferrotron_ir::{Graph, ParamId, ValueId};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;

/// How the plan was asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartitionOptions {
    /// Tensor-parallel degree.
    pub tp: u64,
    /// Data-parallel degree.
    pub dp: u64,
    /// Hold the activations between tensor-parallel regions split along the sequence.
    pub sequence_parallel: bool,
    /// Pad the vocabulary to a multiple of `vocab_multiple × tp` (Megatron's 128).
    pub vocab_multiple: u64,
    /// Parameters whose tensor-parallel layout the user fixed, by name.
    pub pins: Vec<(String, Layout)>,
}

impl Default for PartitionOptions {
    fn default() -> Self {
        PartitionOptions {
            tp: 1,
            dp: 1,
            sequence_parallel: false,
            vocab_multiple: 128,
            pins: Vec::new(),
        }
    }
}

/// How every rank holds one parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamShard {
    /// The parameter's name.
    pub name: String,
    /// Its full shape in the plan (the vocabulary dimension padded).
    pub shape: Vec<u64>,
    /// Its shape in the model file (differs from `shape` only by vocabulary padding, always at
    /// the end of the split dimension; the padding is zero and never reaches the loss).
    pub model_shape: Vec<u64>,
    /// Its layout (parameters are always replicated across the data-parallel group).
    pub layout: MeshLayout,
    /// Blocks of the split dimension (3 for a fused q|k|v weight), 1 otherwise.
    pub blocks: u32,
}

impl ParamShard {
    /// The shape each rank holds.
    pub fn local_shape(&self, mesh: Mesh) -> Vec<u64> {
        let mut s = self.shape.clone();
        if let Layout::Split(d) = self.layout.tp {
            if let Some(x) = s.get_mut(d) {
                *x /= mesh.tp.max(1);
            }
        }
        s
    }

    /// The ranges of the full tensor's split dimension that tensor-parallel rank `rank` holds,
    /// in the order they are laid out locally (one range, or one per block), with that dimension;
    /// `None` for a replicated parameter.
    pub fn ranges(&self, rank: u64, tp: u64) -> Option<(usize, Vec<Range<u64>>)> {
        let Layout::Split(d) = self.layout.tp else {
            return None;
        };
        let blocks = u64::from(self.blocks.max(1));
        let block = self.shape[d] / blocks;
        let part = block / tp;
        let ranges = (0..blocks)
            .map(|b| {
                let start = b * block + rank * part;
                start..start + part
            })
            .collect();
        Some((d, ranges))
    }
}

/// A partitioned, differentiated model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The model's name.
    pub model: String,
    /// The mesh it runs on.
    pub mesh: Mesh,
    /// The options it was made with.
    pub options: PartitionOptions,
    /// The SPMD program: shard-local shapes, forward then backward.
    pub graph: Graph,
    /// Every value's layout.
    pub layouts: SecondaryMap<ValueId, MeshLayout>,
    /// Every parameter's shard, indexed like `graph.params`.
    pub params: Vec<ParamShard>,
    /// Index into `graph.order` of the first backward node.
    pub backward_start: usize,
    /// The scalar loss.
    pub loss: ValueId,
    /// Each trainable parameter's gradient, reduced over both axes and laid out like it.
    pub grads: Vec<(ParamId, ValueId)>,
    /// The vocabulary size and what it was padded to, if padded.
    pub vocab_padding: Option<(u64, u64)>,
}

/// Reading or writing a plan file.
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a plan.
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What the parser says.
        message: String,
    },
    /// A plan whose layouts do not hold together.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// What the verifier found.
        source: PlanError,
    },
}

impl Plan {
    /// The plan as RON text.
    pub fn to_ron(&self) -> String {
        let config = ron::ser::PrettyConfig::new()
            .depth_limit(4)
            .indentor(" ".to_string());
        ron::ser::to_string_pretty(self, config).expect("a plan always serialises")
    }

    /// Reads a plan from RON text and verifies it; `path` is for error messages.
    pub fn from_ron(text: &str, path: &str) -> Result<Plan, PlanFileError> {
        let plan: Plan = ron::from_str(text).map_err(|e| PlanFileError::Parse {
            path: path.to_owned(),
            line: e.span.start.line,
            col: e.span.start.col,
            message: e.code.to_string(),
        })?;
        verify_plan(&plan).map_err(|source| PlanFileError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        Ok(plan)
    }

    /// Writes the plan to `path` atomically (a temporary file in the same directory, then a
    /// rename), so a reader never sees half a plan.
    pub fn save(&self, path: &Path) -> Result<(), PlanFileError> {
        let io = |source| PlanFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, self.to_ron()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
    }

    /// Reads and verifies a plan file.
    pub fn load(path: &Path) -> Result<Plan, PlanFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Plan::from_ron(&text, &path.display().to_string())
    }

    /// The parameter's shard.
    pub fn shard(&self, p: ParamId) -> &ParamShard {
        &self.params[ferrotron_ir::graph::EntityRef::index(p)]
    }
}
