//! Plans as RON text: what `ferrotron partition -o` writes and `view` reads back. Reading
//! verifies the plan ([`crate::verify_plan`]), so a hand-edited plan whose layouts do not hold
//! together is rejected with the node's name before anything runs it. The caller reads and
//! writes the file; this module only converts.

use crate::check::{verify_plan, PlanError};
use crate::plan::Plan;

/// Why plan text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    /// Not a plan.
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        /// The file the text came from.
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
        /// The file the text came from.
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

    /// Reads a plan from RON text and verifies it; `path` names the text in error messages.
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
}
