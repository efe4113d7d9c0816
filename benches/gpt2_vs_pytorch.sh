#!/usr/bin/env bash
# GPT-2 small, batch 4, sequence 128, one forward + backward step: tokens per second of
# ferrotron at tp = 1 (2 matmul threads) and tp = 2 (1 thread per rank), beside PyTorch eager
# (Hugging Face GPT2LMHeadModel, 2 threads) measured in the same run. Run by hand, never by CI.
#
#   bash benches/gpt2_vs_pytorch.sh [--setup] [--runs N] [--train [--steps S]]
#
# --train     whole training steps instead (forward, backward, clipping, AdamW): ferrotron's
#             `train --json` (the median step after the first, all cores: tp = 1 and tp = 2
#             with the cores split between the ranks) against PyTorch with torch.optim.AdamW on
#             2 threads, in the same run; plus numpy's sgemm on 2 threads, and each step's model
#             FLOPs (6 × parameters + 12 × layers × hidden × sequence per token) per second as a
#             share of that sgemm rate.
# --steps S   training steps per ferrotron process (default 6).
#
# --setup     make target/bench-venv (python3 -m venv) and install torch (CPU wheels from
#             PyTorch's index, else PyPI's torch) and transformers, if not there yet.
# --runs N    ferrotron processes per configuration (default 3); the median is reported.
#
# Without the virtual environment (and without --setup) only ferrotron's numbers are printed.
#
# What is timed: ferrotron's `run --json` reports the forward and backward compute time of its
# one step (`forward_ms` + `backward_ms`, the slowest rank's; partitioning, weight
# initialisation and process start are not counted) and tokens_per_second = batch·seq / that.
# Each ferrotron process takes one step, cold; PyTorch takes 2 warm-up steps, then the median of
# 5 (benches/gpt2_pytorch.py). Both have dropout 0.1 on, both zero/allocate gradients each step.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/bench-venv"
setup=0
runs=3
train=0
steps=6
while [ $# -gt 0 ]; do
    case "$1" in
        --setup) setup=1 ;;
        --runs) runs="$2"; shift ;;
        --runs=*) runs="${1#--runs=}" ;;
        --train) train=1 ;;
        --steps) steps="$2"; shift ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

cd "$root"
echo "building ferrotron (release)..." >&2
cargo build --release --quiet
bin="$root/target/release/ferrotron"

have_torch() {
    [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null
}

if [ "$setup" = 1 ] && ! have_torch; then
    echo "setting up $venv (torch + transformers; the download is large)..." >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
        if "$venv/bin/pip" install --quiet --timeout 20 --retries 1 torch \
            --index-url https://download.pytorch.org/whl/cpu; then
            echo "installed torch from PyTorch's CPU index" >&2
        else
            echo "PyTorch's CPU index unreachable or failed; installing torch from PyPI" \
                 "(the Linux wheel also pulls CUDA libraries, unused here)" >&2
            "$venv/bin/pip" install --quiet torch
        fi
    fi
    "$venv/bin/pip" install --quiet transformers
fi

# One ferrotron configuration, `runs` processes: prints the JSON lines.
ferrotron_runs() {
    local tp="$1" threads="$2" i
    for ((i = 0; i < runs; i++)); do
        if [ "$train" = 1 ]; then
            # The cores split between the ranks (the default): `threads` is ignored.
            "$bin" train models/gpt2-small.ron --dim seq=128 --dim batch=4 --tp "$tp" \
                --data README.md --steps "$steps" --json 2>/dev/null
        else
            "$bin" run models/gpt2-small.ron --dim seq=128 --dim batch=4 \
                --tp "$tp" --threads "$threads" --json
        fi
    done
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cut -d' ' -f1-3 /proc/loadavg > "$tmp/load_before"
echo "ferrotron tp=1, 2 threads ($runs runs)..." >&2
ferrotron_runs 1 2 > "$tmp/tp1.jsonl"
echo "ferrotron tp=2, 1 thread per rank ($runs runs)..." >&2
ferrotron_runs 2 1 > "$tmp/tp2.jsonl"

if have_torch; then
    echo "PyTorch eager, 2 threads..." >&2
    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 \
        "$venv/bin/python" "$root/benches/gpt2_pytorch.py" --threads 2 --batch 4 --seq 128 \
        $([ "$train" = 1 ] && echo --train) > "$tmp/torch.json"
    if [ "$train" = 1 ]; then
        echo "numpy sgemm, 2 threads..." >&2
        OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$venv/bin/python" -c '
import time, numpy as np
n = 2048
a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(6))
print(2 * n ** 3 / best)' > "$tmp/sgemm"
    fi
fi
echo "$train" > "$tmp/train"

cut -d' ' -f1-3 /proc/loadavg > "$tmp/load_after"

python3 - "$tmp" <<'EOF'
import json, os, statistics, sys
tmp = sys.argv[1]

def load(name):
    with open(os.path.join(tmp, name)) as f:
        return [json.loads(l) for l in f if l.strip().startswith("{")]

train = open(os.path.join(tmp, "train")).read().strip() == "1"
rows = []
for name, label, threads in [("tp1.jsonl", "ferrotron tp=1", "2"),
                             ("tp2.jsonl", "ferrotron tp=2", "2 (1/rank)")]:
    js = load(name)
    tps = [j["tokens_per_second"] for j in js]
    if train:
        ms = [j["step_s"] * 1e3 for j in js]
        first = statistics.median(j["first_step_s"] * 1e3 for j in js)
        note = f"median step after the first; first step {first:.0f} ms"
    else:
        ms = [j["forward_ms"] + j["backward_ms"] for j in js]
        fwd = statistics.median(j["forward_ms"] for j in js)
        bwd = statistics.median(j["backward_ms"] for j in js)
        note = f"fwd {fwd:.0f} ms + bwd {bwd:.0f} ms"
    rows.append((label, threads, statistics.median(tps), min(tps), max(tps),
                 statistics.median(ms), note))
torch = None
if os.path.exists(os.path.join(tmp, "torch.json")):
    torch = load("torch.json")[0]
    st = torch["step_seconds"]
    rows.append(("pytorch eager", str(torch["threads"]), torch["tokens_per_second"],
                 4 * 128 / max(st), 4 * 128 / min(st), torch["seconds_per_step"] * 1e3,
                 f"torch {torch['torch']}, transformers {torch['transformers']}, "
                 f"attention {torch['attn_implementation']}"))

sgemm = None
if os.path.exists(os.path.join(tmp, "sgemm")):
    sgemm = float(open(os.path.join(tmp, "sgemm")).read().strip())
# GPT-2 small's model FLOPs per token of a training step: 6 x parameters (forward and backward
# matmuls) + 12 x layers x hidden x sequence (attention scores and context).
params, layers, hidden, seq, tokens = 124_439_808, 12, 768, 128, 4 * 128
flops_per_step = tokens * (6 * params + 12 * layers * hidden * seq)

print()
what = "training step (AdamW)" if train else "forward + backward"
print(f"GPT-2 small (124M), batch 4 x seq 128 = 512 tokens, {what}, dropout 0.1")
print(f"{'implementation':<16} {'threads':<11} {'tokens/s':>9} {'(min-max)':>13} "
      f"{'ms/step':>8} {'vs PyTorch':>10} {'of sgemm':>9}  notes")
for label, threads, tps, lo, hi, ms, note in rows:
    ratio = f"{tps / torch['tokens_per_second']:.2f}x" if torch else "-"
    share = f"{flops_per_step / (ms / 1e3) / sgemm:.0%}" if sgemm else "-"
    print(f"{label:<16} {threads:<11} {tps:>9.0f} {f'({lo:.0f}-{hi:.0f})':>13} "
          f"{ms:>8.0f} {ratio:>10} {share:>9}  {note}")
if sgemm:
    print(f"numpy sgemm (2048^3, 2 threads): {sgemm / 1e9:.1f} GFLOP/s; 'of sgemm' is the step's "
          f"model FLOPs ({flops_per_step / 1e9:.0f} G) per second over it")
print(("ferrotron: median over its processes of each one's median step after the first"
       if train else "ferrotron: median of its processes (one cold step each)")
      + ("; PyTorch: median of 5 steps after 2 warm-up steps." if torch else "."))
load = [open(os.path.join(tmp, f)).read().strip() for f in ("load_before", "load_after")]
print(f"load average before {load[0]}, after {load[1]} on {os.cpu_count()} CPUs "
      "(other work on the machine skews all three rows)")
if torch is None:
    print("\nNo PyTorch numbers: run `bash benches/gpt2_vs_pytorch.sh --setup` once to make "
          "target/bench-venv with torch and transformers (a large download from PyPI).")
EOF
