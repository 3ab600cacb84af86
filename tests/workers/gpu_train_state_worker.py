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
"""

from __future__ import annotations

import os

# cuBLAS picks its workspace (and so its reduction order) per handle; a fixed workspace size
# makes GEMMs reproducible across processes. Read when the first handle is made, so set first.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402

from megatron_prime import distributed  # noqa: E402
from megatron_prime.checkpoint.train_state import load_train_state, save_train_state  # noqa: E402
from megatron_prime.config import OptimizerConfig, ParallelConfig, PrecisionConfig  # noqa: E402
from megatron_prime.models.builder import BuiltModel, build_model  # noqa: E402
from megatron_prime.models.optimizer import (  # noqa: E402
    build_optimizer,
    sequence_nll_loss,
    train_step,
)
from workers.train_state_worker import (  # noqa: E402
    EXTRA,
    MICRO_BATCH_SIZE,
    ROLES,
    random_batch,
    tiny_hf_config,
)

SEED = 1234


class DeviceTrainer:
    """Policy and PRM with Adam and a moving lr, at a chosen precision (TP=PP=DP=1)."""

    def __init__(self, precision: PrecisionConfig) -> None:
        hf_config = tiny_hf_config()
        self.models: dict[str, BuiltModel] = {}
        self.optimizers: dict[str, Any] = {}
        self.schedulers: dict[str, OptimizerParamScheduler] = {}
        for role in ROLES:
            model = build_model(hf_config, role, ParallelConfig(), precision)
            optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3, clip_grad=1.0,
                                                               weight_decay=0.01))
            self.models[role] = model
            self.optimizers[role] = optimizer
            self.schedulers[role] = OptimizerParamScheduler(
                optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
                lr_decay_steps=8, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                wd_incr_steps=8, wd_incr_style="constant")

    def step(self) -> list[float]:
        batch = random_batch()  # from the global torch RNG: resuming needs it restored
        losses = []
        for role in ROLES:
            result = train_step(self.models[role], self.optimizers[role], batch,
                                MICRO_BATCH_SIZE, sequence_nll_loss)
            assert result.update_successful, result.skip_reason
            self.schedulers[role].step(1)
            losses.append(result.metrics["loss"])
        return losses

    def save(self, root: Path, step: int) -> Path:
        return save_train_state(root, step, self.models, self.optimizers, self.schedulers,
                                EXTRA, keep_last=2)

    def load(self, folder: Path) -> int:
        step, _ = load_train_state(folder, self.models, self.optimizers, self.schedulers)
        return step

    def weights(self) -> list[torch.Tensor]:
        """The models' weights in their own dtype (bf16 on the GPU), copied to the host."""
        return [p.detach().cpu().clone() for role in ROLES
                for chunk in self.models[role].gpt_chunks() for p in chunk.parameters()]

    def state(self) -> dict[str, list[torch.Tensor]]:
        """Weights and every Adam tensor (fp32 main param, both moments, step count), copied
        to the host (after the first step: Adam's state exists from then on)."""
        weights = self.weights()
        adam = []
        for role in ROLES:
            optimizer = self.optimizers[role]
            for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
                for group in sub.optimizer.param_groups:
                    for param in group["params"]:
                        state = sub.optimizer.state[param]
                        adam += [t.detach().cpu().clone() for t in (
                            param, state["exp_avg"], state["exp_avg_sq"], state["step"])]
        return {"weights": weights, "adam": adam}


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
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    # warn_only: an op without a deterministic kernel warns (recorded below) instead of
    # stopping the check; if it then breaks bit-exactness, the warning names the culprit.
    torch.use_deterministic_algorithms(True, warn_only=True)
    caught = warnings.catch_warnings(record=True)
    recorded = caught.__enter__()
    warnings.simplefilter("always")
    runtime = distributed.init_distributed(ParallelConfig(), seed=SEED, use_gpu=on_gpu)
    precision = PrecisionConfig(dtype="bfloat16" if on_gpu else "float32", layer_spec="local")
    trainer = DeviceTrainer(precision)
    result: dict[str, Any] = {"device": str(runtime.device),
                              "param_dtype": str(trainer.weights()[0].dtype)}
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
        saved_step2 = DeviceTrainer(precision)
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
