//! The partitioner: turns the one-device [`ferrotron_ir::Graph`] into a tensor-parallel ×
//! data-parallel plan (layouts, the Megatron strategy, f/g and the other collectives, a layout
//! verifier). Not implemented yet: this crate is a placeholder in the workspace so the dependency
//! direction (ir ← partitioner ← runtime) is fixed from the start. See issue 3 and
//! `../shared/DESIGN.md`.
