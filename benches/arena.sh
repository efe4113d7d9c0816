#!/usr/bin/env bash
# The rank's arena (the memory plan's offsets in one allocation per rank, kept across steps)
# against an allocation per value (`--no-arena`), side by side in one run: GPT-2 small training
# steps (`ferrotron train ... --steps N --json`: the median step after the first, with the
# process's system and user CPU time and minor page faults per step counted the same way), both
# ways interleaved round by round, at each configuration given as "TP SEQ BATCH [PP MICRO]"
# (with PP pipeline stages, the batch in MICRO micro-batches).
#
#   bash benches/arena.sh [--runs R] [--steps N] ["TP SEQ BATCH [PP MICRO]" ...]
#
# Defaults: 3 rounds, 6 steps, "1 128 4" "2 128 4". Prints a markdown table (medians over the
# rounds, min–max of the step in brackets).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
steps=6
configs=()
while [ $# -gt 0 ]; do
    case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    *) configs+=("$1"); shift ;;
    esac
done
[ ${#configs[@]} -gt 0 ] || configs=("1 128 4" "2 128 4")
cargo build --release -q
bin=target/release/ferrotron
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for round in $(seq 1 "$runs"); do
    for c in "${configs[@]}"; do
        read -r tp seq batch pp micro <<<"$c"
        pp=${pp:-1} micro=${micro:-1}
        for mode in per-value arena; do
            flag=()
            [ "$mode" = per-value ] && flag=(--no-arena)
            [ "$pp" -gt 1 ] && flag+=(--pp "$pp" --micro-batches "$micro")
            "$bin" train models/gpt2-small.ron --dim seq="$seq" --dim batch="$batch" \
                --tp "$tp" --data README.md --steps "$steps" --json "${flag[@]}" 2>/dev/null \
                >"$out/$tp-$seq-$batch-$pp-$micro-$mode-$round.json"
        done
    done
done

python3 - "$out" "$runs" "${configs[@]}" <<'EOF'
import json, statistics, sys
out, runs, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| tp × pp | batch × seq (micro-batches) | values | tokens/s | step ms (min–max) | system s / step | % of step | user s / step | minor faults / step | arena MiB (rank 0) |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
for c in configs:
    tp, seq, batch, pp, micro = (c.split() + ["1", "1"])[:5]
    for mode in ["per-value", "arena"]:
        rs = [json.load(open(f"{out}/{tp}-{seq}-{batch}-{pp}-{micro}-{mode}-{r}.json")) for r in range(1, runs + 1)]
        med = lambda k: statistics.median(r[k] for r in rs)
        step = [r["step_s"] * 1e3 for r in rs]
        sys_s = med("system_s_per_step")
        arena = "–" if mode == "per-value" else f"{med('arena_bytes_per_rank') / 2**20:,.1f}"
        print(f"| {tp} × {pp} | {batch} × {seq} ({micro}) | {mode} | {med('tokens_per_second'):,.0f} | "
              f"{statistics.median(step):,.0f} ({min(step):,.0f}–{max(step):,.0f}) | "
              f"{sys_s:.3f} | {100 * sys_s / med('step_s'):.1f}% | {med('user_s_per_step'):.2f} | "
              f"{med('minor_faults_per_step'):,.0f} | {arena} |")
EOF
