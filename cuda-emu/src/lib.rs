//! A CPU stand-in for the CUDA driver, cuBLAS and NCCL, so that ferrotron's CUDA backend runs
//! end to end without a GPU: in CI, and on any development machine.
//!
//! ```text
//! runtime/cuda/src/cu/*.cu ─► build.rs: each compiled as C++ behind csrc/cuda_shim.h
//!                                  + csrc/kernel_emu.cpp (threads of a block as fibers:
//!                                    __syncthreads, warp shuffles, static __shared__)
//!                                  + csrc/driver.cpp (the driver API cudarc calls)
//!                             ─► $OUT_DIR/lib/libcuda.so, libcublas.so (csrc/cublas.cpp),
//!                                 libnccl.so (csrc/nccl.cpp: collectives between processes)
//! a test process started with LD_LIBRARY_PATH=lib_dir() ─► cudarc dlopens these instead of
//!   NVIDIA's: the CUDA backend's own code (NVRTC compile, module load, launches with their
//!   argument checks, cuBLAS calls, streams, events, virtual-rank collectives, NCCL
//!   communicators under `ferrotron launch`) runs unchanged
//! ```
//!
//! What it proves and what it cannot: the kernels' arithmetic and indexing, the launch code
//! (grid shapes, arguments, strides), the GEMM geometry and the host-side protocol run exactly
//! as on a GPU, and the results are compared with the CPU backend by the same tests a GPU
//! session runs (`runtime/backend-tests/tests/cuda_emulated.rs`) and through the CLI
//! (`tests/cuda_cli.rs`).
//! Streams are asynchronous (`FTEMU_SCHEDULE`: `lazy` runs a stream's work only when something
//! waits for it, `peers` runs every other stream's work before queuing more), and fresh and freed
//! device memory reads as NaN, so a missing wait between streams, an output element a kernel
//! forgets to write, or a read after a free shows up in the results. It does not execute the
//! PTX NVRTC produced (the compile test checks that), and says nothing about speed.

/// The directory holding the stand-in `libcuda.so`, `libcublas.so` and `libnccl.so`; `None`
/// where the build
/// found no C++ compiler (the build printed a warning; the emulated tests then say they are
/// skipped).
pub fn lib_dir() -> Option<&'static str> {
    let dir = env!("FERROTRON_CUDA_EMU_DIR");
    (!dir.is_empty()).then_some(dir)
}

/// The engine's self-test executable (`csrc/selftest.cpp`), where it was built.
pub fn engine_selftest() -> Option<&'static str> {
    let exe = env!("FERROTRON_CUDA_EMU_SELFTEST");
    (!exe.is_empty()).then_some(exe)
}

/// The driver's self-test executable (`csrc/driver_selftest.cpp`), where it was built.
pub fn driver_selftest() -> Option<&'static str> {
    let exe = env!("FERROTRON_CUDA_EMU_DRIVER_SELFTEST");
    (!exe.is_empty()).then_some(exe)
}

/// The directory holding NVRTC's `libnvrtc.so.13` (CUDA 13), which the CUDA backend compiles its
/// kernels with: `$FERROTRON_NVRTC_DIR` at build time, else NVIDIA's PyPI wheel the build
/// installed; `None` where the build could not (it printed a warning).
pub fn nvrtc_dir() -> Option<&'static str> {
    let dir = env!("FERROTRON_NVRTC_DIR");
    (!dir.is_empty()).then_some(dir)
}

/// The dynamic loader's search path for a child process that runs the CUDA backend on the
/// stand-in: its libraries first, then NVRTC, then `existing` (the caller's
/// `LD_LIBRARY_PATH`). `None` where the stand-in was not built.
pub fn library_path(existing: Option<&str>) -> Option<String> {
    let mut dirs = vec![lib_dir()?];
    dirs.extend(nvrtc_dir());
    dirs.extend(existing.filter(|p| !p.is_empty()));
    Some(dirs.join(":"))
}

/// Makes NVRTC loadable in this process: unless the loader finds `libnvrtc.so.13` already, loads
/// it from [`nvrtc_dir`] by its full path, so that a later load by name (cudarc's) finds it
/// loaded. Returns whether NVRTC is loadable now.
pub fn load_nvrtc() -> bool {
    const NAME: &std::ffi::CStr = c"libnvrtc.so.13";
    // SAFETY: dlopen with a NUL-terminated name; the handle is kept for the process's life
    // (never closed), as cudarc keeps its own.
    if !unsafe { libc::dlopen(NAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null() {
        return true;
    }
    let Some(dir) = nvrtc_dir() else {
        return false;
    };
    let Ok(path) = std::ffi::CString::new(format!("{dir}/libnvrtc.so.13")) else {
        return false;
    };
    // SAFETY: as above, with the library's full path.
    !unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}
