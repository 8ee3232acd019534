#!/usr/bin/env bash
# The GPU suite (docs/gpu.md): every GPU measurement in one run of at most 8 minutes, one JSON and
# one log into the directory given.
#
#   bash scripts/gpu_suite.sh --out DIR            # on a lent GPU (make gpu-suite OUT=DIR)
#   DRY=1 bash scripts/gpu_suite.sh --out DIR      # tiny shapes on a CPU (--dry)
#   bash scripts/gpu_suite.sh --stage-anchor       # the first of two calls: keep anchor part 1 there
#
# It runs under $PYTHON, default python3 (on the GPU machines the one that holds torch). Before
# the cases, scripts/gpu_suite.py installs the wheels of .whl (scripts/fetch_gpu_wheels.sh) with
# pip --no-index --find-links; every other option is scripts/gpu_suite.py's (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_suite.py "$@"   # DRY=1 is read there
