"""Run by tests/test_gpu_train_state.py (torchrun, one process): resume on a device, bit for bit.

Modes:
  train   policy and PRM (Adam, warmup+cosine scheduler, grad clipping) take 2 steps on random
          batches; the train state is saved after each (step_00000001, step_00000002). The
          weights and Adam state after step 2 go to --snapshot, the losses to --out.
  resume  a fresh process builds new models and optimizers, loads step_00000001, takes
          step 2, and compares with --snapshot: weights and Adam state with ``torch.equal``,
          losses with ``==``. It also loads step_00000002 into yet another set of models and
          checks that the saved state itself equals the snapshot.

The model, batch and optimizer settings are tests/workers/train_state_worker.py's (the CPU
version of this check); only the device and precision differ: ``--device cuda`` builds bf16
models with Megatron's local layer spec (no Transformer Engine on the GPU test machine), fp32
master weights and Adam state. On CUDA, kernels with a nondeterministic default (atomics in the
embedding's backward, cuBLAS workspaces) are switched to deterministic ones before any CUDA
work; without that, a resumed run may differ from the uninterrupted one in the last bits for
reasons unrelated to checkpointing.

Megatron picks the Adam implementation at import: Transformer Engine's FusedAdam where TE is
importable (else Apex's), torch's otherwise; ``adam_classes`` in the output says which ran.
tests/test_gpu_fused_adam.py runs this worker with a fused Adam, with and without
``--distributed-optimizer``, and with ``--layer-spec te``.
"""

from __future__ import annotations

import os

# Transformer Engine's layers (--layer-spec te) pick deterministic kernels only when told so.
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
# cuBLAS picks its workspace (and so its reduction order) per handle; a fixed workspace size
# makes GEMMs reproducible across processes. Read when the first handle is made, so set first.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from megatron_prime import distributed  # noqa: E402
from megatron_prime.config import ParallelConfig, PrecisionConfig  # noqa: E402
from workers.train_state_worker import Trainer  # noqa: E402

SEED = 1234


class DeviceTrainer(Trainer):
    """train_state_worker's trainer (one process, no distributed optimizer) at a precision."""

    def __init__(self, precision: PrecisionConfig, distributed_optimizer: bool = False) -> None:
        super().__init__(ParallelConfig(), distributed_optimizer, precision)

    def load(self, folder: Path) -> int:
        return super().load(folder)[0]

    def state(self) -> dict[str, list[torch.Tensor]]:
        """Weights (their own dtype: bf16 on the GPU) and every Adam tensor (fp32 main param,
        both moments, step count), copied to the host (Adam's state exists after a step)."""
        return {"weights": [t.cpu() for t in self.weights()],
                "adam": [t.cpu() for t in self.adam_state()]}


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y)
                                    for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("train", "resume"))
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    # Megatron's distributed optimizer (one process: DP=1, the state in its flat buffers).
    parser.add_argument("--distributed-optimizer", action="store_true")
    # "te": Transformer Engine's layer spec (what a GPU run builds), not Megatron's local one.
    parser.add_argument("--layer-spec", choices=("local", "te"), default="local")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    # warn_only: an op without a deterministic kernel warns (recorded below) instead of
    # stopping the check; if it then breaks bit-exactness, the warning names the culprit.
    torch.use_deterministic_algorithms(True, warn_only=True)
    caught = warnings.catch_warnings(record=True)
    recorded = caught.__enter__()
    warnings.simplefilter("always")
    runtime = distributed.init_distributed(ParallelConfig(), seed=SEED, use_gpu=on_gpu)
    precision = PrecisionConfig(dtype="bfloat16" if on_gpu else "float32",
                                layer_spec="auto" if args.layer_spec == "te" else "local")
    trainer = DeviceTrainer(precision, args.distributed_optimizer)
    result: dict[str, Any] = {"device": str(runtime.device),
                              "param_dtype": str(trainer.weights()[0].dtype),
                              "adam_classes": trainer.adam_classes()}
    if args.mode == "train":
        first = trainer.step()
        trainer.save(args.root, 1)
        second = trainer.step()
        trainer.save(args.root, 2)
        torch.save(trainer.state(), args.snapshot)
        result["losses"] = [first, second]
    else:
        snapshot = torch.load(args.snapshot, weights_only=True)
        result["loaded_step"] = trainer.load(args.root / "step_00000001")
        result["resumed_losses"] = trainer.step()
        resumed = trainer.state()
        saved_step2 = DeviceTrainer(precision, args.distributed_optimizer)
        saved_step2.load(args.root / "step_00000002")
        result["checks"] = {
            "resumed_weights_equal": equal(resumed["weights"], snapshot["weights"]),
            "resumed_adam_equal": equal(resumed["adam"], snapshot["adam"]),
            "step2_checkpoint_equal": equal(saved_step2.state()["weights"], snapshot["weights"])
            and equal(saved_step2.state()["adam"], snapshot["adam"]),
        }
        if not result["checks"]["resumed_weights_equal"]:
            result["max_weight_diff"] = max(
                float((x.double() - y.double()).abs().max())
                for x, y in zip(resumed["weights"], snapshot["weights"]))
    caught.__exit__(None, None, None)
    result["nondeterministic_ops"] = sorted({str(w.message).splitlines()[0] for w in recorded
                                             if "deterministic" in str(w.message)})
    args.out.write_text(json.dumps(result))
    distributed.destroy_distributed()


if __name__ == "__main__":
    main()
