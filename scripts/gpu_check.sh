#!/usr/bin/env bash
# The prepared device check (issue 16): one command, <= 10 minutes on one GPU, JSON on stdout.
#   scripts/gpu_check.sh            # from the repository root, with the project's Python environment active
# CUDA tests (pytest -m cuda), a short gpu-d12-shaped training run (tokens/s, MFU vs the datasheet dense bf16 peak,
# peak memory beside the estimate), bench decode. Without a CUDA GPU: one sentence on stderr, exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 python -m chatsmith bench gpu --json "$@"
