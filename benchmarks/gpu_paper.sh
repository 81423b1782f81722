#!/usr/bin/env bash
# Table 1 at the paper's schedule (benchmarks/gpu_table1.py --schedule paper), one step per device call,
# resumable across GPU sessions (docs/training.md, "The paper-schedule run"). Each call writes the
# results and the trained models' bf16 shards to $OUT; a later session copies what came back into
# .carry/table1-paper/ (carried with the call) and continues from it.
#   OUT=... bash benchmarks/gpu_paper.sh train kap_s0.1 [extra gpu_table1 flags, e.g. --epochs 150]
#   OUT=... bash benchmarks/gpu_paper.sh train nt_s0.1  [the same flags]
#   OUT=... bash benchmarks/gpu_paper.sh attack         [e.g. --skip-square]
set -u
stage=${1:?usage: gpu_paper.sh train MODEL | attack [gpu_table1 flags]}; shift
source benchmarks/gpu_env.sh || exit 1
work=${WORK:-/tmp/kapify-paper}
carry=.carry/table1-paper
mkdir -p "$work" "$OUT"
import=(); [ -f "$carry/results.json" ] && import=(--import "$carry")
case "$stage" in
  train) models=${1:?train needs a model: kap_s0.1 or nt_s0.1}; shift
         $py benchmarks/gpu_table1.py --schedule paper --out "$work" --data-dir .data --stages train --models "$models" \
           --export "$OUT" "${import[@]}" "$@" 2>&1 | grep -v "it/s" | tail -40 ;;
  attack) $py benchmarks/gpu_table1.py --schedule paper --out "$work" --data-dir .data --stages attack \
           --export "$OUT" "${import[@]}" "$@" 2>&1 | grep -v "it/s" | tail -40 ;;
  *) echo "gpu_paper.sh: unknown stage $stage (train or attack)" >&2; exit 2 ;;
esac
ls -la "$OUT"
