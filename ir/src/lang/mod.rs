//! The RON model language: the user's entry point. [`load_model`] reads a `models/*.ron` file,
//! resolves its named dimensions (with `--dim` overrides), expands its blocks and repeats, infers
//! every shape, verifies the result and returns the one-device [`Graph`] that the partitioner
//! takes. Every mistake comes back as a [`ModelError`] with file, line and column, the node's name
//! where there is one, and what would have been valid.
//!
//! - [`syntax`]: the file's structure as serde reads it.
//! - [`expr`]: dimension expressions (`"4 * hidden"`).
//! - [`locate`]: finds an entry's line and column for errors found after parsing.
//! - `lower`: from syntax tree to graph.

pub mod expr;
pub mod locate;
mod lower;
pub mod syntax;

use crate::graph::Graph;
use crate::infer::OpError;
use crate::verify::VerifyError;
use expr::EvalError;
pub use locate::Position;
use std::fmt;
use std::path::Path;
use thiserror::Error;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `--dim NAME=VALUE` overrides, applied before any expression is evaluated.
    pub overrides: Vec<(String, u64)>,
    /// Upper bound on the expanded graph's nodes, so a typo such as `layers: 72000000` is an
    /// error rather than an exhausted machine.
    pub max_nodes: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            overrides: Vec::new(),
            max_nodes: 20_000_000,
        }
    }
}

/// A mistake in a model file, located.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelError {
    /// The file as the user named it.
    pub file: String,
    /// Where in the file, when known.
    pub pos: Option<Position>,
    /// The node (or dimension, parameter, block) concerned, with its expanded name.
    pub node: Option<String>,
    /// What is wrong (boxed: errors are rare, and the `Result`s that carry them are not).
    pub kind: Box<ErrorKind>,
    /// Context that may explain it (the `--dim` overrides in force).
    pub note: Option<String>,
}

impl std::error::Error for ModelError {}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(p) = self.pos {
            write!(f, ":{}:{}", p.line, p.col)?;
        }
        f.write_str(": ")?;
        if let Some(node) = &self.node {
            write!(f, "in `{node}`: ")?;
        }
        write!(f, "{}", self.kind)?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// What is wrong with a model file.
#[derive(Clone, Debug, PartialEq, Error)]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum ErrorKind {
    /// The file cannot be read.
    #[error("cannot read the file: {0}")]
    Io(String),
    /// RON syntax, an unknown field or op, a wrong type: reported by the parser.
    #[error("{0}")]
    Syntax(String),
    /// A dimension expression has no value.
    #[error("{0}")]
    Dim(EvalError),
    /// A `--dim` override names no dimension of the model.
    #[error("--dim {name}: the model has no such dimension{}; its dimensions are: {known}", expr::suggest(.suggestion))]
    UnknownOverride {
        name: String,
        suggestion: Option<String>,
        known: String,
    },
    /// A statement reads a name that nothing defines.
    #[error("`{name}` is not defined here{}", expr::suggest(.suggestion))]
    Undefined {
        name: String,
        suggestion: Option<String>,
    },
    /// Statements that read each other's outputs in a loop.
    #[error("values depend on each other in a cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
    /// A name defined twice in one scope.
    #[error("`{0}` is defined more than once")]
    Duplicate(String),
    /// A name that cannot be used.
    #[error("invalid name `{0}`: names are non-empty and use letters, digits, `_`, `.` and `-`")]
    BadName(String),
    /// `Call`/`Repeat` of a block that does not exist.
    #[error("unknown block `{name}`{}", expr::suggest(.suggestion))]
    UnknownBlock {
        name: String,
        suggestion: Option<String>,
    },
    /// A block applied to the wrong number of values.
    #[error("block `{block}` takes {expected} input(s), {found} given")]
    BlockInputs {
        block: String,
        expected: usize,
        found: usize,
    },
    /// A statement names more or fewer outputs than it produces.
    #[error("{what} produces {expected} output(s), but {found} name(s) are given")]
    OutputCount {
        what: String,
        expected: usize,
        found: usize,
    },
    /// A block whose repeated application cannot chain.
    #[error("`{block}` cannot be repeated: {why}")]
    Repeat { block: String, why: String },
    /// A block that applies itself.
    #[error("block `{0}` applies itself: {1}")]
    Recursive(String, String),
    /// An op applied to inputs it cannot take.
    #[error("{op}: {error}")]
    Op { op: &'static str, error: OpError },
    /// The expansion is larger than [`LoadOptions::max_nodes`].
    #[error("the model expands to more than {0} nodes")]
    TooLarge(usize),
    /// The lowered graph fails verification (a bug in the front-end, reported rather than run).
    #[error("internal error, the lowered graph is invalid: {0}")]
    Verify(VerifyError),
}

/// Reads, expands, infers and verifies a model file.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<Graph, ModelError> {
    let file = path.display().to_string();
    let src = read(path, &file, None)?;
    parse_model(&src, &file, opts)
}

/// Like [`load_model`], from source text; `file` names it in errors and is the path that an
/// `extends` is resolved against.
pub fn parse_model(src: &str, file: &str, opts: &LoadOptions) -> Result<Graph, ModelError> {
    load(src, file, Path::new(file).parent(), opts)
}

fn read(path: &Path, file: &str, pos: Option<Position>) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|e| ModelError {
        file: file.to_owned(),
        pos,
        node: None,
        kind: Box::new(ErrorKind::Io(format!("{}: {e}", path.display()))),
        note: None,
    })
}

fn parse(src: &str, file: &str) -> Result<syntax::ModelFile, ModelError> {
    ron::Options::default()
        .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
        .from_str(src)
        .map_err(|e| ModelError {
            file: file.to_owned(),
            pos: Some(Position {
                line: e.span.start.line,
                col: e.span.start.col,
            }),
            node: None,
            kind: Box::new(ErrorKind::Syntax(e.code.to_string())),
            note: None,
        })
}

/// A model that extends another may nest, but not without end.
const MAX_EXTENDS_DEPTH: usize = 8;

fn load(
    src: &str,
    file: &str,
    dir: Option<&Path>,
    opts: &LoadOptions,
) -> Result<Graph, ModelError> {
    let mut model = parse(src, file)?;
    let (mut src, mut file, mut dir) =
        (src.to_owned(), file.to_owned(), dir.map(Path::to_path_buf));
    let mut depth = 0;
    // What the outermost extending file changed, to explain errors found in the inherited graph.
    let mut note: Option<String> = None;
    // Fold each `extends` chain into one syntax tree, located in the file that holds the graph.
    while let Some(base) = model.extends.take() {
        let here = |kind| ModelError {
            file: file.clone(),
            pos: locate::locate(&src, &["extends"]),
            node: None,
            kind: Box::new(kind),
            note: None,
        };
        depth += 1;
        if depth > MAX_EXTENDS_DEPTH {
            return Err(here(ErrorKind::Syntax(format!(
                "`extends` nests more than {MAX_EXTENDS_DEPTH} deep (a file extending itself?)"
            ))));
        }
        if !(model.inputs.0.is_empty()
            && model.params.0.is_empty()
            && model.blocks.0.is_empty()
            && model.body.0.is_empty()
            && model.outputs.is_empty())
        {
            return Err(here(ErrorKind::Syntax(
                "a model that extends another sets only `name`, `description` and `dims`".into(),
            )));
        }
        let base_path = dir.as_deref().unwrap_or(Path::new("")).join(&base);
        let base_file = base_path.display().to_string();
        let base_src = read(&base_path, &file, locate::locate(&src, &["extends"]))?;
        let mut parent = parse(&base_src, &base_file)?;
        let mut sets = Vec::new();
        for (name, expr) in model.dims.0 {
            let Some(slot) = parent.dims.0.iter_mut().find(|(n, _)| *n == name) else {
                return Err(ModelError {
                    file: file.clone(),
                    pos: locate::locate(&src, &["dims", &name]),
                    node: Some(name.clone()),
                    kind: Box::new(ErrorKind::Syntax(format!(
                        "`{base}` has no dimension `{name}`{}; it has: {}",
                        expr::suggest(&syntax::closest(&name, parent.dims.names())),
                        parent.dims.names().collect::<Vec<_>>().join(", ")
                    ))),
                    note: None,
                });
            };
            sets.push(format!("{name}={}", expr.text));
            slot.1 = expr;
        }
        if note.is_none() && !sets.is_empty() {
            note = Some(format!("{file} sets {}", sets.join(" ")));
        }
        parent.name = model.name;
        parent.description = model.description.or(parent.description);
        model = parent;
        src = base_src;
        file = base_file;
        dir = base_path.parent().map(Path::to_path_buf);
    }
    lower::lower(&model, &src, &file, opts).map_err(|mut e| {
        // An error in the inherited graph may come from the dimensions the extending file set.
        e.note = e.note.take().or(note);
        e
    })
}

/// Parses a `--dim` argument, `NAME=VALUE`.
pub fn parse_dim_override(arg: &str) -> Result<(String, u64), String> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, found `{arg}`"))?;
    let value = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a non-negative integer (in `{arg}`)"))?;
    Ok((name.trim().to_owned(), value))
}
