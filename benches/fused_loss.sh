#!/usr/bin/env bash
# The fused output layer and loss against the unfused logits and cross-entropy, side by side in one run (benches/fusion_ab.sh).
#
#   bash benches/fused_loss.sh [--runs R] [--steps N] ["TP SEQ BATCH" ...]
exec bash "$(dirname "$0")/fusion_ab.sh" --without --no-fuse-loss "$@"
