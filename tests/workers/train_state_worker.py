"""Run by tests/test_train_state.py (under torchrun, or as one plain process).

Modes:
  roundtrip  train 2 steps, save, train 2 more; then build fresh models and optimizers, load,
             train the same 2 steps: losses, weights, Adam state, scheduler and RNG draws are
             compared exactly; results of rank 0 (with every rank's checks) go to --out.
  crash      save step 1 (its weights and Adam state go to --snapshot), train one step, then
             save step 2 with the crash hook armed by the test: the process dies mid-save.
  resume     resume=auto from --root, compare with --snapshot, check the errors for a model
             the checkpoint lacks and for a distributed optimizer (the checkpoint has a plain
             one), then save steps 2 and 3 with keep_last=2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_prime import distributed
from megatron_prime.checkpoint.train_state import (
    CheckpointConfig,
    load_train_state,
    resolve_resume,
    save_train_state,
)
from megatron_prime.config import OptimizerConfig, ParallelConfig, PrecisionConfig
from megatron_prime.models.builder import BuiltModel, build_model
from megatron_prime.models.optimizer import (
    build_optimizer,
    sequence_nll_loss,
    train_step,
)
from megatron_prime.models.schedule import TokenBatch

ROLES = ("policy", "prm")
VOCAB = 64
BATCH_SIZE = 4
SEQ_LENGTH = 12
PROMPT_LENGTH = 5
MICRO_BATCH_SIZE = 2
EXTRA = {"rows_consumed": 8, "history": [1.5, 2.25], "run": "train-state-test"}


def tiny_hf_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])


def random_batch() -> TokenBatch:
    """Random tokens from the global torch RNG, so that resuming needs the RNG restored."""
    input_ids = torch.randint(0, VOCAB, (BATCH_SIZE, SEQ_LENGTH))
    response_mask = torch.zeros(BATCH_SIZE, SEQ_LENGTH)
    response_mask[:, PROMPT_LENGTH:] = 1
    return TokenBatch(input_ids, response_mask)


class Trainer:
    """Policy and PRM, each with Adam and a warmup+cosine scheduler (so the lr moves)."""

    def __init__(self, parallel: ParallelConfig, distributed_optimizer: bool,
                 precision: PrecisionConfig | None = None) -> None:
        hf_config = tiny_hf_config()
        self.models: dict[str, BuiltModel] = {}
        self.optimizers: dict[str, Any] = {}
        self.schedulers: dict[str, OptimizerParamScheduler] = {}
        for role in ROLES:
            model = build_model(hf_config, role, parallel, precision,
                                use_distributed_optimizer=distributed_optimizer)
            optimizer = build_optimizer(model, OptimizerConfig(
                lr=1e-3, clip_grad=1.0, weight_decay=0.01,
                use_distributed_optimizer=distributed_optimizer))
            self.models[role] = model
            self.optimizers[role] = optimizer
            self.schedulers[role] = OptimizerParamScheduler(
                optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
                lr_decay_steps=8, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                wd_incr_steps=8, wd_incr_style="constant")

    def step(self) -> list[float]:
        """One step of each model on a new random batch; each DP rank takes its own rows."""
        batch = random_batch()
        rows = BATCH_SIZE // distributed.dp_world_size()
        first = distributed.dp_rank() * rows
        local = TokenBatch(batch.input_ids[first:first + rows],
                           batch.response_mask[first:first + rows])
        losses = []
        for role in ROLES:
            result = train_step(self.models[role], self.optimizers[role], local,
                                min(MICRO_BATCH_SIZE, rows), sequence_nll_loss)
            assert result.update_successful
            self.schedulers[role].step(1)
            losses.append(result.metrics["loss"])
        return losses

    def save(self, root: Path, step: int, keep_last: int = 2) -> Path:
        return save_train_state(root, step, self.models, self.optimizers, self.schedulers,
                                EXTRA, keep_last)

    def load(self, folder: Path) -> tuple[int, dict]:
        return load_train_state(folder, self.models, self.optimizers, self.schedulers)

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for role in ROLES
                for chunk in self.models[role].gpt_chunks() for p in chunk.parameters()]

    def adam_state(self) -> list[torch.Tensor]:
        """Every Adam tensor in order: the (fp32 main) param, both moments and the step count
        (torch's Adam keeps one per parameter; a fused Adam, on GPU, one int per group)."""
        tensors = []
        for role in ROLES:
            optimizer = self.optimizers[role]
            for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
                for group in sub.optimizer.param_groups:
                    for param in group["params"]:
                        state = sub.optimizer.state[param]
                        step = (state["step"].clone() if "step" in state
                                else torch.tensor(float(group["step"])))
                        # clone() everything: Adam updates these tensors in place.
                        tensors += [param.detach().clone(), state["exp_avg"].clone(),
                                    state["exp_avg_sq"].clone(), step]
        return tensors

    def adam_classes(self) -> list[str]:
        """The torch-level optimizer classes Megatron picked (torch's Adam, or a fused one)."""
        return sorted({f"{type(sub.optimizer).__module__}.{type(sub.optimizer).__name__}"
                       for optimizer in self.optimizers.values()
                       for sub in getattr(optimizer, "chained_optimizers", [optimizer])})

    def lrs(self) -> list[float]:
        return [group["lr"] for role in ROLES for group in self.optimizers[role].param_groups]


def rng_draws() -> dict[str, Any]:
    """One draw from every generator a checkpoint restores."""
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracker = torch.rand(3).tolist()
    return {"torch": torch.rand(3).tolist(), "python": random.random(),
            "numpy": float(np.random.rand()), "megatron_tracker": tracker}


def scramble_rng() -> None:
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(100)


def all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def gather(value: Any) -> list[Any]:
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def roundtrip(args: argparse.Namespace, parallel: ParallelConfig) -> dict[str, Any] | None:
    root = Path(args.root)
    trainer = Trainer(parallel, args.distributed_optimizer)
    first_losses = [trainer.step(), trainer.step()]
    folder = trainer.save(root, 2)
    saved = {"weights": trainer.weights(), "adam": trainer.adam_state(), "lrs": trainer.lrs(),
             "rng": rng_draws()}
    continued_losses = [trainer.step(), trainer.step()]
    continued_weights = trainer.weights()

    scramble_rng()
    fresh = Trainer(parallel, args.distributed_optimizer)  # new models, optimizers, schedulers
    fresh_differs = not all_equal(fresh.weights(), saved["weights"])
    step, extra = fresh.load(folder)
    checks = {
        "fresh_weights_differed": fresh_differs,
        "weights_restored": all_equal(fresh.weights(), saved["weights"]),
        "adam_restored": all_equal(fresh.adam_state(), saved["adam"]),
        "lrs_restored": fresh.lrs() == saved["lrs"],
        "rng_restored": rng_draws() == saved["rng"],
    }
    resumed_losses = [fresh.step(), fresh.step()]
    checks["final_weights_equal"] = all_equal(fresh.weights(), continued_weights)
    checks["final_weights_moved"] = not all_equal(continued_weights, saved["weights"])
    checks_per_rank = gather(checks)
    if torch.distributed.get_rank() != 0:
        return None
    return {
        "step": step,
        "extra": extra,
        "folder": str(folder),
        "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
        "first_losses": first_losses,
        "continued_losses": continued_losses,
        "resumed_losses": resumed_losses,
        "checks_per_rank": checks_per_rank,
    }


def crash(args: argparse.Namespace, parallel: ParallelConfig) -> None:
    trainer = Trainer(parallel, distributed_optimizer=False)
    trainer.step()
    trainer.save(Path(args.root), 1)
    torch.save({"weights": trainer.weights(), "adam": trainer.adam_state()}, args.snapshot)
    trainer.step()
    trainer.save(Path(args.root), 2)  # the test armed the crash hook for step 2
    raise AssertionError("the crash hook did not fire")


def resume(args: argparse.Namespace, parallel: ParallelConfig) -> dict[str, Any]:
    root = Path(args.root)
    folder = resolve_resume(CheckpointConfig(dir=str(root), resume="auto"), root)
    trainer = Trainer(parallel, distributed_optimizer=False)
    errors = {}
    try:
        load_train_state(folder, {**trainer.models, "value": trainer.models["policy"]},
                         trainer.optimizers, trainer.schedulers)
    except ValueError as error:
        errors["missing_model"] = str(error)
    sharded = Trainer(parallel, distributed_optimizer=True)
    try:
        sharded.load(folder)
    except ValueError as error:
        errors["optimizer_kind"] = str(error)
    step, extra = trainer.load(folder)
    snapshot = torch.load(args.snapshot, weights_only=True)
    result = {
        "resumed_from": str(folder),
        "step": step,
        "extra": extra,
        "weights_restored": all_equal(trainer.weights(), snapshot["weights"]),
        "adam_restored": all_equal(trainer.adam_state(), snapshot["adam"]),
        "errors": errors,
        "listings": [],
    }
    for step in (2, 3):
        trainer.step()
        trainer.save(root, step, keep_last=2)
        result["listings"].append(sorted(p.name for p in root.iterdir()))
    return result


def damaged(args: argparse.Namespace, parallel: ParallelConfig) -> dict[str, Any]:
    """Saves steps 1 and 2, truncates the largest .distcp of step 2's policy and loads it,
    then truncates step 1's RNG file and loads that: the error of each load."""
    root = Path(args.root)
    trainer = Trainer(parallel, distributed_optimizer=False)
    trainer.step()  # Adam has state to save
    trainer.save(root, 1)
    trainer.save(root, 2)
    distcp = max((root / "step_00000002" / "policy").glob("*.distcp"), key=lambda f: f.stat().st_size)
    size = distcp.stat().st_size
    os.truncate(distcp, size // 2)
    rng_file = root / "step_00000001" / "rng" / "rank_00000.pt"
    os.truncate(rng_file, rng_file.stat().st_size // 2)
    errors = {}
    for name, step in (("distcp", 2), ("rng", 1)):
        try:
            Trainer(parallel, distributed_optimizer=False).load(root / f"step_{step:08d}")
            errors[name] = None
        except BaseException as error:  # the test wants to see what escapes, whatever it is
            errors[name] = [type(error).__name__, str(error)]
    return {"errors": errors, "distcp": distcp.name, "size": size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("roundtrip", "crash", "resume", "damaged"), required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--root", required=True)
    parser.add_argument("--snapshot")
    parser.add_argument("--out")
    args = parser.parse_args()

    parallel = ParallelConfig(tensor_parallel_size=args.tp)
    distributed.init_distributed(parallel, seed=1234)
    if args.mode == "crash":
        crash(args, parallel)
    modes = {"roundtrip": roundtrip, "resume": resume, "damaged": damaged}
    result = modes[args.mode](args, parallel)
    if result is not None:
        Path(args.out).write_text(json.dumps(result))
    distributed.destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
