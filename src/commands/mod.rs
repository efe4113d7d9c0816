//! One module per subcommand, named after it: its arguments and what it does with them.

pub mod check;
pub mod export;
pub mod export_hf;
pub mod generate;
pub mod import;
pub mod launch;
pub mod partition;
pub mod plan;
pub mod reshard;
pub mod run;
pub mod simulate;
pub mod train;
pub mod view;
