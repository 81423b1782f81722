#!/usr/bin/env bash
# The one-shot command for a lent GPU machine (torch, torchvision, timm preinstalled, no network):
# kapify from the checkout, timm/pyautoattack carried in .whl/, CIFAR-10 JPEG archives in .data/.
# Runs benchmarks/gpu_table1.py, then the issue-12 sigma-sweep study in whatever time is left
# (it resumes, so a cut run still leaves study.json for the runs it finished), and copies the
# reports to $OUT (results land flat: the device tool returns at most 8 files).
#   usage: OUT=/some/dir bash benchmarks/gpu_run.sh [budget seconds, default 570] [extra gpu_table1 flags]
set -u
budget=${1:-570}; shift || true
work=${WORK:-/tmp/kapify-gpu}
mkdir -p "$work" "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
[ -d .whl/site ] && mkdir -p /tmp/site && cp -r .whl/site/* /tmp/site/
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi -L 2>/dev/null
$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
timeout $((budget - SECONDS - 90)) $py benchmarks/gpu_table1.py --out "$work/table1" --data-dir .data "$@" 2>&1 | tee "$OUT/table1-log.txt" | grep -v "it/s"
left=$((budget - SECONDS - 15))
if [ "$left" -gt 60 ]; then
  timeout "$left" $py recipes/study.py --config recipes/studies/cpu_sigma_sweep.yaml --data-dir .data --no-download \
    --out "$work/study" --no-progress 2>&1 | grep -v "it/s" | tail -40
fi
cp "$work"/table1/results.json "$work"/table1/results.md "$OUT"/ 2>/dev/null
cp "$work"/table1/overhead.json "$work"/table1/overhead.txt "$OUT"/ 2>/dev/null
cp "$work"/study/study.json "$work"/study/study.md "$work"/study/pareto.png "$OUT"/ 2>/dev/null
ls -la "$OUT"
