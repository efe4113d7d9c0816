//! The visualizer: an egui window and SVG/DOT export showing how a model was partitioned. Not
//! implemented yet: this crate is a placeholder in the workspace; it will depend on the IR and the
//! partitioner, never on the runtime. See issue 6.
