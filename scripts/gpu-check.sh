#!/usr/bin/env bash
# The GPU check of the CUDA backend, one command on a machine with an NVIDIA GPU:
#   1. builds the CUDA tests and the GPU benchmark (with cargo if the machine has it; otherwise
#      from a bundle made beforehand on a build machine with `scripts/gpu-check.sh --bundle`,
#      which writes target/gpu-bundle: test and bench executables plus the model files),
#   2. runs every CUDA kernel against the CPU backend (ferrotron-backend-tests' cuda_ops), the
#      CUDA-vs-CPU equivalence tests of the tiny models at tp = 1, 2, 4 on virtual ranks
#      (cuda_equivalence) and the NVRTC compile test (ferrotron-cuda's compile),
#   3. runs the benchmark: forward + backward of one GPT layer at the 8.3B shape in bf16 against
#      a large cuBLAS bf16 GEMM.
# Everything is logged under $OUT (default target/gpu-check). Exits non-zero if a test fails.
# The CUDA libraries are taken from the Python environment's nvidia/*/lib folders when the
# loader does not find them already. Meant to finish in well under 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-check}
mkdir -p "$OUT"
BUNDLE=target/gpu-bundle
# package:test
TESTS=(ferrotron-cuda:compile ferrotron-backend-tests:cuda_ops ferrotron-backend-tests:cuda_attention ferrotron-backend-tests:cuda_loss ferrotron-backend-tests:cuda_equivalence)

if [[ "${1:-}" == "--bundle" ]]; then
    # On the build machine: release executables of the tests and the benchmark, stripped.
    set -e
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin"
    for pt in "${TESTS[@]}"; do
        cargo test --release -p "${pt%%:*}" --test "${pt#*:}" --no-run --message-format=json 2>/dev/null |
            python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], sys.argv[1] + "/bin/" + m["target"]["name"])
' "$BUNDLE"
    done
    cargo bench -p ferrotron-cuda --bench gpu_layer --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        shutil.copy(m["executable"], sys.argv[1] + "/bin/gpu_layer")
' "$BUNDLE"
    strip "$BUNDLE"/bin/* 2>/dev/null || true
    ls -la "$BUNDLE/bin"
    exit 0
fi

# The CUDA libraries: the loader's own, else a Python environment's pip packages.
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so'; then
    for py in python3 /opt/torch/.venv/bin/python3; do
        dirs=$("$py" - 2>/dev/null <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
libs = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})
print(":".join(libs))
EOF
        ) || true
        if [[ -n "$dirs" ]]; then
            export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            break
        fi
    done
    if [[ -z "${LD_LIBRARY_PATH:-}" ]]; then
        # No interpreter answered: the usual places of the wheels.
        dirs=$(ls -d /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib \
            /usr/local/lib/python3*/dist-packages/nvidia/*/lib 2>/dev/null | paste -sd: -)
        [[ -n "$dirs" ]] && export LD_LIBRARY_PATH="$dirs"
    fi
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" | tee "$OUT/env.txt"
nvidia-smi >>"$OUT/env.txt" 2>&1 || echo "nvidia-smi not available" >>"$OUT/env.txt"
export FERROTRON_REQUIRE_NVRTC=1 FERROTRON_REQUIRE_GPU=1 FERROTRON_MODELS="$PWD/models"
# A writable kernel cache shared by every test process (compiling all sources takes seconds).
export FERROTRON_CACHE_DIR="${FERROTRON_CACHE_DIR:-$PWD/target/kernel-cache}"
mkdir -p "$FERROTRON_CACHE_DIR"

status=0
if command -v cargo >/dev/null 2>&1; then
    # Build once, then run each test binary (its output in its own log).
    for pt in "${TESTS[@]}"; do
        t=${pt#*:}
        cargo test --release -p "${pt%%:*}" --test "$t" -- --test-threads=1 2>&1 |
            tee "$OUT/$t.log" || status=1
    done
    cargo bench -p ferrotron-cuda --bench gpu_layer 2>&1 | tee "$OUT/gpu_layer.log" || status=1
else
    [[ -d "$BUNDLE/bin" ]] || { echo "no cargo and no $BUNDLE: run scripts/gpu-check.sh --bundle on a build machine first"; exit 2; }
    # The tests find the model files relative to their build tree; run them from the repository.
    for pt in "${TESTS[@]}"; do
        t=${pt#*:}
        "$BUNDLE/bin/$t" --test-threads=1 2>&1 | tee "$OUT/$t.log" || status=1
    done
    OUT="$OUT" "$BUNDLE/bin/gpu_layer" 2>&1 | tee "$OUT/gpu_layer.log" || status=1
fi
echo "gpu-check: $([[ $status == 0 ]] && echo passed || echo FAILED)" | tee -a "$OUT/env.txt"
exit $status
