#!/usr/bin/env bash
# The one-shot command for a lent GPU machine (torch, torchvision, timm preinstalled, no network):
# kapify from the checkout, timm/pyautoattack carried in .whl/, CIFAR-10 JPEG archives in .data/.
# Runs benchmarks/gpu_table1.py without Square (leaving FT_SECONDS), then the issue-15 fine-tuning study
# (recipes/studies/gpu_finetune_resnet18.yaml) from table1's trained NT(σ=0.1) model, then table1 again
# for Square in whatever time is left (it resumes), and copies the reports to $OUT after each stage
# (the device tool returns at most 8 files, flat).
#   usage: OUT=/some/dir bash benchmarks/gpu_run.sh [budget seconds, default 570] [extra gpu_table1 flags]
set -u
budget=${1:-570}; shift || true
ft_seconds=${FT_SECONDS:-150}
work=${WORK:-/tmp/kapify-gpu}
mkdir -p "$work" "$OUT"
source benchmarks/gpu_env.sh || exit 1
collect() {  # whatever exists now; called after each stage so a cut run still returns its reports
  cp "$work"/table1/results.json "$work"/table1/results.md "$work"/table1/overhead.txt "$OUT"/ 2>/dev/null
  for f in study.json study.md pareto.png; do cp "$work/ft/$f" "$OUT/ft-$f" 2>/dev/null; done
}
timeout $((budget - SECONDS - ft_seconds)) $py benchmarks/gpu_table1.py --out "$work/table1" --data-dir .data --skip-square "$@" 2>&1 \
  | tee "$OUT/table1-log.txt" | grep -v "it/s"
collect
left=$((budget - SECONDS - 10))
if [ "$left" -gt 40 ] && [ -f "$work/table1/runs/nt_s0.1/model.safetensors" ]; then
  mkdir -p "$work/ft/runs"
  cp -r "$work/table1/runs/nt_s0.1" "$work/ft/runs/"   # the trained plain model: evaluated there, fine-tuned here
  timeout "$left" $py recipes/study.py --config recipes/studies/gpu_finetune_resnet18.yaml --data-dir .data --no-download \
    --out "$work/ft" --only ft_arrange_warm,ft_warm,ft_cold --no-progress ${FT_FLAGS:---n-examples 250} 2>&1 | grep -v "it/s" | tail -30
fi
collect
left=$((budget - SECONDS - 10))
if [ "$left" -gt 30 ]; then
  timeout "$left" $py benchmarks/gpu_table1.py --out "$work/table1" --data-dir .data "$@" 2>&1 | grep -v "it/s" | tail -20
fi
collect
ls -la "$OUT"
