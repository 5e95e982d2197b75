"""docs/online_rl.md's case study, *RL with verifiable rewards on a CPU*, with vLLM sampling: its model has
64-wide heads so that vLLM's CPU attention runs it. Runs where vLLM is installed, as tests/test_vllm.py's do."""

from __future__ import annotations

import pytest
from test_rlvr_case import arith, run_case  # noqa: F401 (arith: the module's fixture)
from test_vllm import HAVE_VLLM

pytestmark = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed in this environment; its tests run in their own one: "
    "`bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest -q tests/test_vllm_rlvr.py`",
)


def test_the_short_case_study_with_vllm_sampling(tmp_path, arith):  # noqa: F811
    """tests/test_rlvr_case.py's run with the colocated engine drawing every rollout and every eval sample:
    the same gains, and the engine follows the policy (its log-probs are the trainer's up to rounding)."""
    metrics = run_case(arith, tmp_path, "generation.backend=vllm", "generation.vllm.cpu_kv_cache_gb=0.25")
    for m in metrics:
        assert m["sampler/logp_diff/max"] < 1e-3, m
