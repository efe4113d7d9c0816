#!/usr/bin/env bash
# One fusion against the unfused ops, side by side in one run: GPT-2 small's forward and backward
# (`ferrotron run ... --steps N --json`: the median step after the first, the forward and
# backward of the last, rank 0's measured peak and planned arena) with the fusion's `--no-fuse-*`
# flag and without, interleaved round by round, at each configuration given as "TP SEQ BATCH".
#
#   bash benches/fusion_ab.sh --without FLAG [--runs R] [--steps N] ["TP SEQ BATCH" ...]
#
# FLAG: `--no-fuse-attention` (benches/fused_attention.sh) or `--no-fuse-loss`
# (benches/fused_loss.sh). Defaults: 3 rounds, 5 steps, "1 128 4" "2 128 4" "1 1024 1". Prints a
# markdown table (medians over the rounds, min–max of the step in brackets).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
steps=5
without=""
configs=()
while [ $# -gt 0 ]; do
    case "$1" in
    --without) without="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    *) configs+=("$1"); shift ;;
    esac
done
[ -n "$without" ] || { echo "usage: $0 --without --no-fuse-attention|--no-fuse-loss ..." >&2; exit 2; }
[ ${#configs[@]} -gt 0 ] || configs=("1 128 4" "2 128 4" "1 1024 1")
cargo build --release -q
bin=target/release/ferrotron
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for round in $(seq 1 "$runs"); do
    for c in "${configs[@]}"; do
        read -r tp seq batch <<<"$c"
        for mode in unfused fused; do
            flag=()
            [ "$mode" = unfused ] && flag=("$without")
            "$bin" run models/gpt2-small.ron --dim seq="$seq" --dim batch="$batch" \
                --tp "$tp" --steps "$steps" --json "${flag[@]}" 2>/dev/null \
                >"$out/$tp-$seq-$batch-$mode-$round.json"
        done
    done
done

python3 - "$out" "$runs" "${without#--no-fuse-}" "${configs[@]}" <<'EOF'
import json, statistics, sys
out, runs, what, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
print(f"| tp | batch × seq | {what} | step ms (min–max) | forward ms | backward ms | peak MiB / rank | arena MiB |")
print("|---:|---|---|---:|---:|---:|---:|---:|")
for c in configs:
    tp, seq, batch = c.split()
    base = None
    for mode in ["unfused", "fused"]:
        rs = [json.load(open(f"{out}/{tp}-{seq}-{batch}-{mode}-{r}.json")) for r in range(1, runs + 1)]
        step = [r["step_s"] * 1e3 for r in rs]
        med = statistics.median(step)
        fw = statistics.median(r["forward_ms"] for r in rs)
        bw = statistics.median(r["backward_ms"] for r in rs)
        peak = statistics.median(r["peak_bytes_per_rank"] for r in rs) / 2**20
        arena = statistics.median(r["arena_bytes_per_rank"] for r in rs) / 2**20
        note = "" if base is None else f" ({base / med:.2f}×)"
        print(f"| {tp} | {batch} × {seq} | {mode} | {med:,.0f} ({min(step):,.0f}–{max(step):,.0f}){note} | {fw:,.0f} | {bw:,.0f} | {peak:,.1f} | {arena:,.1f} |")
        base = med
EOF
