//! ferrotron's intermediate representation: the dataflow graph that every other part reads.
//!
//! ```text
//! models/*.ron ──► lang: parse, expand blocks, infer shapes ──► Graph ──► verify
//!                                                                 │
//!                     partitioner, autodiff, runtimes, visualizer ◄┘
//! ```
//!
//! - [`lang`]: the RON model language (the user's entry point) and its located errors.
//! - [`graph`]: values, nodes, parameters and block scopes in typed arenas; program order.
//! - [`op`]: the closed op set, generic over how it names values, shared by files and plans.
//! - [`infer`]: shape and dtype inference per op.
//! - [`verify`]: the invariants every pass must keep.
//! - [`autodiff`]: reverse-mode autodiff, appending a scalar loss's backward pass to the graph.
//! - [`dropout`]: a model at another dropout rate, or without dropout (evaluation).
//! - [`count`]: parameters and FLOPs; [`summary`]: what `ferrotron check` prints.
//! - [`reference`](mod@reference): the reference evaluator, the executable semantics of every op.
//! - [`index`]: the shape and index arithmetic every evaluator of the op set shares: the `f64`
//!   reference and the runtimes' kernels.
#![warn(missing_docs)]

pub mod autodiff;
pub mod count;
pub mod dropout;
pub mod dtype;
pub mod graph;
pub mod index;
pub mod infer;
pub mod lang;
pub mod op;
pub mod reference;
pub mod shape;
pub mod summary;
pub mod verify;

pub use autodiff::{backward, AutodiffError, Backward};
pub use dtype::DType;
pub use graph::{Graph, Init, NodeId, ParamId, Pin, ScopeId, ValueDef, ValueId};
pub use infer::{infer, OpError};
pub use lang::{load_model, parse_model, LoadOptions, ModelError};
pub use op::{Activation, Factor, MeshAxis, Op, RopeScaling};
pub use shape::{Dim, Shape, TensorType};
pub use verify::{verify, VerifyError};
