"""Run by tests/test_credit.py as one plain process: writes a training run's step folder whose
``prm`` role holds the weights of an HF folder, as the trainer saves one (train_state.py), so
that the credit CLI can be pointed at a real checkpoint.

    python tests/workers/credit_checkpoint_worker.py --hf HF_FOLDER --root CHECKPOINT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_io import non_weight_files
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.checkpoint.train_state import save_train_state
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.optimizer import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    hf = Path(args.hf)
    parallel = ParallelConfig()
    distributed.init_distributed(parallel, use_gpu=False)
    try:
        model = build_model(json.loads((hf / "config.json").read_text()), "prm", parallel)
        load_hf_weights(model, load_file(str(hf / "model.safetensors")))
        optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3))
        folder = save_train_state(args.root, 3, {"prm": model}, {"prm": optimizer}, {}, {}, keep_last=1,
                                  hf_files=non_weight_files(hf))
        print(folder)
    finally:
        distributed.destroy_distributed()


if __name__ == "__main__":
    main()
