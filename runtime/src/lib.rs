//! The runtimes: execute a partitioned plan on CPU threads or CUDA GPUs, forward, backward and
//! optimizer step, checked against the unpartitioned model. Not implemented yet: this crate is a
//! placeholder in the workspace. See issues 4 (CPU) and 5 (CUDA).
