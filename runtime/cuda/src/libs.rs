//! Finding the CUDA libraries at run time.
//!
//! cudarc loads libcuda, libnvrtc, libcublas(Lt) and libnccl with `dlopen` on first use and
//! panics if one is absent, so every entry point of the CUDA backend asks here first and turns an
//! absence into [`CudaError::Unavailable`] with what to install or where to point the loader.

use super::CudaError;

/// A CUDA library the backend loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    /// libcuda: the driver (comes with the NVIDIA kernel driver, not with pip).
    Driver,
    /// libnvrtc: the run-time compiler for the kernels.
    Nvrtc,
    /// libcublas: the GEMMs.
    Cublas,
    /// libcublasLt: the GEMMs with fused epilogues.
    CublasLt,
    /// libnccl: collectives across GPUs and processes.
    Nccl,
}

impl Lib {
    /// The library's file name stem.
    pub fn file(self) -> &'static str {
        match self {
            Lib::Driver => "libcuda",
            Lib::Nvrtc => "libnvrtc",
            Lib::Cublas => "libcublas",
            Lib::CublasLt => "libcublasLt",
            Lib::Nccl => "libnccl",
        }
    }

    /// Where it usually comes from.
    fn hint(self) -> &'static str {
        match self {
            Lib::Driver => {
                "install the NVIDIA driver (libcuda.so.1 ships with it); without a GPU, the \
                 CPU stand-in in cuda-emu/ runs the backend (README: \"Without a GPU\")"
            }
            Lib::Nvrtc => "pip install nvidia-cuda-nvrtc (CUDA 13) and add its lib directory to LD_LIBRARY_PATH",
            Lib::Cublas | Lib::CublasLt => {
                "pip install nvidia-cublas (CUDA 13) and add its lib directory to LD_LIBRARY_PATH"
            }
            Lib::Nccl => "pip install nvidia-nccl-cu13 and add its lib directory to LD_LIBRARY_PATH",
        }
    }

    /// Whether the loader finds the library.
    pub fn present(self) -> bool {
        // SAFETY: these only try to dlopen the library by its candidate names and close it again.
        unsafe {
            match self {
                Lib::Driver => cudarc::driver::sys::is_culib_present(),
                Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
                Lib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                Lib::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }
}

/// `Ok` when every library in `libs` loads; otherwise an error naming each missing one and how
/// to get it.
pub fn require(libs: &[Lib]) -> Result<(), CudaError> {
    let missing: Vec<String> = libs
        .iter()
        .filter(|l| !l.present())
        .map(|l| format!("{} not found: {}", l.file(), l.hint()))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CudaError::Unavailable(missing.join("; ")))
    }
}
