# Sourced by the GPU scripts: what a bare lent GPU machine (torch, torchvision, timm preinstalled, no
# network) needs to run kapify from the checkout. Wheels for the rest (safetensors, pyautoattack, ...)
# are carried in .whl/ (or unpacked in .whl/site/); installs them into /tmp/site once per machine.
if [ ! -f /tmp/site/.kapify-installed ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  fi
  [ -d .whl/site ] && mkdir -p /tmp/site && cp -r .whl/site/* /tmp/site/
  mkdir -p /tmp/site && touch /tmp/site/.kapify-installed
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi -L 2>/dev/null
$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
