//! The kernels' CUDA C sources and their compilation by NVRTC (to be written).
