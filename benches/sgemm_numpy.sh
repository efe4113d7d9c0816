#!/usr/bin/env bash
# numpy's (OpenBLAS) sgemm GFLOP/s on 1 and 2 threads, the baseline for
# `cargo bench -p ferrotron-cpu --bench matmul`. Run by hand (never by CI): it makes a
# Python virtual environment under target/ and installs numpy from PyPI the first time.
#
#   bash benches/sgemm_numpy.sh [--quick] [--avx2] [--only TEXT]
#
# --only TEXT: only GPT-2's products whose name contains TEXT (as the Rust bench's --only).
#
# --avx2: OpenBLAS's Haswell (AVX2) kernels whatever the processor has (OPENBLAS_CORETYPE), to
# compare with `cargo bench -p ferrotron-cpu --bench matmul --no-default-features` on an
# AVX-512 machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/sgemm-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet numpy
fi
args=()
for a in "$@"; do
    case "$a" in
    --avx2) export OPENBLAS_CORETYPE=Haswell ;;
    *) args+=("$a") ;;
    esac
done
for threads in 1 2; do
    OPENBLAS_NUM_THREADS=$threads OMP_NUM_THREADS=$threads \
        "$venv/bin/python" "$root/benches/sgemm_numpy.py" ${args[@]+"${args[@]}"}
done
