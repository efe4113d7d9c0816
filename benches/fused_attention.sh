#!/usr/bin/env bash
# The fused attention against the unfused chain, side by side in one run (benches/fusion_ab.sh).
#
#   bash benches/fused_attention.sh [--runs R] [--steps N] ["TP SEQ BATCH" ...]
exec bash "$(dirname "$0")/fusion_ab.sh" --without --no-fuse-attention "$@"
