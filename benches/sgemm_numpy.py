"""numpy's (OpenBLAS) single-precision GEMM throughput, the baseline for
runtime/cpu/benches/matmul.rs. Run through benches/sgemm_numpy.sh, which sets
OPENBLAS_NUM_THREADS before numpy starts (the thread count is read at import).

Prints GFLOP/s, best of several runs, for the sizes the Rust benchmark uses.
"""

import os
import sys
import time

import numpy as np


def best(runs, f):
    f()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    quick = "--quick" in sys.argv
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "?")
    shapes = [(1024, 1024, 1024)] if quick else [
        (1024, 1024, 1024), (2048, 2048, 2048), (8192, 3072, 768)]
    rng = np.random.default_rng(0)
    for m, n, k in shapes:
        a = rng.random((m, k), dtype=np.float32) - 0.5
        b = rng.random((k, n), dtype=np.float32) - 0.5
        c = np.empty((m, n), dtype=np.float32)
        flops = 2.0 * m * n * k
        runs = 2 if quick else (4 if flops > 3e10 else 8)
        t_alloc = best(runs, lambda: a @ b)
        t_out = best(runs, lambda: np.matmul(a, b, out=c))
        print(f"{m}×{n}×{k:<6} threads {threads}: a @ b {flops / t_alloc / 1e9:7.1f} GFLOP/s,"
              f" matmul(out=) {flops / t_out / 1e9:7.1f} GFLOP/s")
    cfg = np.show_config(mode="dicts") if np.lib.NumpyVersion(np.__version__) >= "1.25.0" else None
    if cfg and threads == "1":
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        print(f"numpy {np.__version__}, BLAS: {blas.get('name', '?')} {blas.get('version', '')}")


if __name__ == "__main__":
    main()
