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


def gpt2_products():
    """GPT-2 small's step at batch 4 x 128 (512 tokens), tp = 1, as
    runtime/cpu/benches/matmul.rs lists it: (name, batch, m, n, k, a transposed, b transposed)."""
    t = 512
    out = []
    for name, i, o in [("c_attn", 768, 2304), ("attn c_proj", 768, 768), ("c_fc", 768, 3072),
                       ("mlp c_proj", 3072, 768)]:
        out += [(name, 1, t, o, i, False, False), (name, 1, t, i, o, False, True),
                (name, 1, i, o, t, True, False)]
    out += [("scores q·kᵀ", 48, 128, 128, 64, False, True),
            ("context p·v", 48, 128, 64, 128, False, False),
            ("d p = dctx·vᵀ", 48, 128, 128, 64, False, True),
            ("d v = pᵀ·dctx", 48, 128, 64, 128, True, False),
            ("d q = ds·k", 48, 128, 64, 128, False, False),
            ("d k = dsᵀ·q", 48, 128, 64, 128, True, False),
            ("logits h·wteᵀ", 1, t, 50257, 768, False, True),
            ("d h = dlogits·wte", 1, t, 768, 50257, False, False),
            ("d wte = dlogitsᵀ·h", 1, 50257, 768, t, True, False)]
    return out


def gpt2_step(rng, threads, only=None):
    print(f"GPT-2 small's training step (batch 4 x 128, tp = 1), threads {threads}, a @ b GFLOP/s")
    for name, batch, m, n, k, ta, tb in gpt2_products():
        if only is not None and only not in name:
            continue
        def operand(rows, cols, transposed):
            shape = (cols, rows) if transposed else (rows, cols)
            if batch > 1:
                shape = (batch,) + shape
            x = rng.random(shape, dtype=np.float32) - 0.5
            return np.swapaxes(x, -1, -2) if transposed else x
        a, b = operand(m, k, ta), operand(k, n, tb)
        flops = 2.0 * batch * m * n * k
        t = best(6, lambda: a @ b)
        flags = ("T" if ta else "N") + ("T" if tb else "N")
        print(f"{name:>22} {batch}×{m}×{n}×{k:<8} {flags} {flops / t / 1e9:7.1f}")


def main():
    quick = "--quick" in sys.argv
    # --only TEXT: only GPT-2's products whose name contains TEXT, no square sizes.
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "?")
    shapes = [(1024, 1024, 1024)] if quick else [] if only is not None else [
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
    if not quick:
        gpt2_step(rng, threads, only)
    cfg = np.show_config(mode="dicts") if np.lib.NumpyVersion(np.__version__) >= "1.25.0" else None
    if cfg and threads == "1":
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        print(f"numpy {np.__version__}, BLAS: {blas.get('name', '?')} {blas.get('version', '')}")


if __name__ == "__main__":
    main()
