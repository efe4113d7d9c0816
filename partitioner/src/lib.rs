//! The partitioner: turns the one-device [`ferrotron_ir::Graph`] into a tensor-parallel ×
//! data-parallel plan (`../shared/DESIGN.md`).
//!
//! Built so far: the layout algebra ([`layout`]) and the per-op sharding rules ([`rules`]) that
//! layout propagation, communication insertion and the layout verifier will be made of. Not built
//! yet: the Megatron strategy, propagation and f/g insertion, the plan, autodiff (issue 3).
#![warn(missing_docs)]

pub mod layout;
pub mod rules;
