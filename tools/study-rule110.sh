#!/usr/bin/env bash
# The CPU sleep study of docs/results.md ("Sleep on a mixed-depth Rule 110"), in the order it was run:
# seeds 0-2 of every loop count first (so a partial study is balanced), the ungated ablation, then seeds 3-4.
# Every sweep is resumable: rerun this script after an interruption and finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
SZ=${SLEEPZOO:-.venv/bin/sleepzoo}
R=recipes/study/rule110-depth.yaml
$SZ sweep $R train.seed=0,1,2 sleep.loops=1,2,4 --jobs 2 --out runs/study/grid
$SZ sweep $R train.seed=0,1 sleep.loops=4 sleep.gate=false --jobs 2 --out runs/study/ungated
$SZ sweep $R train.seed=3,4 sleep.loops=1,2,4 --jobs 2 --out runs/study/grid
