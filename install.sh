#!/usr/bin/env bash
# Installs megatron_prime and its CPU dependencies into the active Python.
# torch goes first and pinned: torch==2.13.0 is a CPU wheel on local disk here, while an
# unpinned torch (asked for by any other package) resolves to a multi-GB CUDA build.
set -euo pipefail
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
