"""One NCCL_CUMEM_ENABLE on every rank (distributed.agree_nccl_cumem): ranks whose values
differ hang in NCCL's first collective, and some vLLM releases set it when imported, i.e. only
on the ranks that host an engine."""

from __future__ import annotations

import os

import pytest

from launch import run_json_worker
from megatron_prime.distributed import NCCL_CUMEM_ENABLE_VALUE, agree_nccl_cumem
from megatron_prime.rollout.engine import _restored_after


@pytest.mark.slow  # two ranks, one of which imports vLLM
def test_a_rank_that_imports_vllm_and_one_that_does_not_agree(tmp_path, monkeypatch):
    monkeypatch.delenv("NCCL_CUMEM_ENABLE", raising=False)
    report = run_json_worker("tests/workers/nccl_cumem_worker.py", 2, [], tmp_path / "out.json")
    assert report["values"] == ["0", "0"]


def test_the_user_value_is_kept_and_otherwise_set():
    environ: dict[str, str] = {}
    assert agree_nccl_cumem(environ) == NCCL_CUMEM_ENABLE_VALUE == "0"
    assert environ == {"NCCL_CUMEM_ENABLE": "0"}
    mine = {"NCCL_CUMEM_ENABLE": "1"}
    assert agree_nccl_cumem(mine) == "1" and mine == {"NCCL_CUMEM_ENABLE": "1"}


def test_the_engine_start_cannot_change_it(monkeypatch):
    """RolloutEngine starts vLLM inside _restored_after("NCCL_CUMEM_ENABLE"): whatever the
    import writes, the trainer process keeps the value every rank agreed on."""
    monkeypatch.setenv("NCCL_CUMEM_ENABLE", "1")
    with _restored_after("NCCL_CUMEM_ENABLE"):
        os.environ["NCCL_CUMEM_ENABLE"] = "0"
    assert os.environ["NCCL_CUMEM_ENABLE"] == "1"
    monkeypatch.delenv("NCCL_CUMEM_ENABLE")
    with _restored_after("NCCL_CUMEM_ENABLE"):
        os.environ["NCCL_CUMEM_ENABLE"] = "0"
    assert "NCCL_CUMEM_ENABLE" not in os.environ
