"""Skips ``@pytest.mark.gpu`` tests, with the reason, where torch sees no CUDA device.

The README's ``python -m pytest`` thus runs everything on a CPU machine and reports the GPU
tests as skipped (``-ra`` names why), and ``python -m pytest -m gpu`` runs only those on a
GPU machine (benchmarks/gpu_check.sh). This file adds no import path: the tests keep
importing ``launch``, ``hf_fixtures`` and ``workers`` as top-level modules through pytest's
own rootdir insertion of tests/.
"""

from __future__ import annotations

import pytest


def cuda_unavailable_reason() -> str | None:
    """Why the GPU tests cannot run here, or None when they can. torch is imported only when
    a GPU test was collected, so CPU-only selections do not pay for CUDA probing."""
    import torch

    if not torch.cuda.is_available():
        return (f"needs a CUDA GPU: torch.cuda.is_available() is False here (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def keep_result(request: pytest.FixtureRequest):
    """``keep_result(name, data)`` writes a GPU test's measurements as JSON into
    ``$MEGATRON_PRIME_RESULTS_DIR`` (benchmarks/gpu_check.sh sets it to its output folder),
    so a run on a lent machine brings back numbers, not only pass/fail; a no-op without it."""
    import json
    import os
    import re
    from pathlib import Path

    folder = os.environ.get("MEGATRON_PRIME_RESULTS_DIR")

    def keep(name: str, data: object) -> None:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            # Plain file names ("test_x[cuda]" -> "test_x_cuda_"): they travel back from the
            # GPU machine and through archives unchanged.
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{request.node.name}.{name}")
            (Path(folder) / f"{stem}.json").write_text(json.dumps(data, indent=1, sort_keys=True))

    return keep
