"""FP8 through Transformer Engine at run time: which models run it, switching it off for one
pass, and the calibration of delayed scaling before a frozen model's first scored pass.

How TE's delayed scaling behaves, and why PRIME has to care (TE 2.x,
``transformer_engine/pytorch/quantization.py``): a module casts to FP8 with the scale its
amax history gave it *before* this pass; the history is rolled and the scales recomputed
when the outermost FP8 region is left **with autograd enabled** (for every module registered
under the same recipe and amax group). A fresh model therefore runs its first FP8 pass at
scale 1, and a model that only runs forward-only passes under ``torch.no_grad`` (the frozen
reference) gets new scales only as a side effect of some other model's FP8 training step,
if any. The implicit reward is beta * (log pi_psi - log pi_ref), a difference of two
log-probs: an FP8 error of the size of that difference is the whole signal. Hence the
defaults (precision.fp8_roles = policy only), the measured log-ratio error when a user puts
the PRM or the reference in FP8 (update.py), and ``calibrate`` below. None of the anchors
runs a PRM in FP8; the logged error is of the kind verl and NeMo-RL log for the gap between
the sampler's and the trainer's log-probs (rollout/logprob_diff_* here).

On CPU, FP8 is refused by ``models/architectures.transformer_config``; without TE installed,
Megatron's FP8 context is a no-op, so these functions can be exercised on CPU by setting
``config.fp8`` on a built model (tests/workers/fp8_worker.py), except ``calibrate``, which
imports TE (tests/test_gpu_fp8.py runs it on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from megatron.core.transformer import TransformerConfig

from megatron_prime import distributed
from megatron_prime.models.builder import BuiltModel
from megatron_prime.models.schedule import TokenBatch, forward_only, forward_outputs

# The roles whose log-probs make the implicit reward (and whose FP8 error is measured).
SCORING_ROLES = ("prm", "reference")


def runs_fp8(model: BuiltModel | None) -> bool:
    return model is not None and model.config.fp8 is not None


def needs_calibration(model: BuiltModel | None) -> bool:
    """A scoring model (reference, PRM) in FP8 with delayed scaling: its first scored pass
    would run at scale 1. The policy is left out: its old log-probs and its first update's
    forward run at the same (initial) scales, so the PPO ratio starts at exactly 1, and its
    training steps update its scales as in any Megatron-LM FP8 run."""
    return (runs_fp8(model) and model.role in SCORING_ROLES
            and str(model.config.fp8_recipe) in ("delayed", "Fp8Recipe.delayed"))


def _transformer_configs(model: BuiltModel) -> list[TransformerConfig]:
    """Every distinct TransformerConfig the model's modules hold (normally one object)."""
    found = {id(model.config): model.config}
    for chunk in model.chunks:
        for module in chunk.modules():
            config = getattr(module, "config", None)
            if isinstance(config, TransformerConfig):
                found.setdefault(id(config), config)
    return list(found.values())


@contextmanager
def fp8_off(model: BuiltModel) -> Iterator[None]:
    """The model's GEMMs in its own precision (bf16) for the block: Megatron opens TE's FP8
    region at each forward from ``config.fp8`` (megatron.core.fp8_utils.get_fp8_context), so
    clearing it is enough; the FP8 scaling state of the modules is left untouched."""
    configs = _transformer_configs(model)
    saved = [config.fp8 for config in configs]
    for config in configs:
        config.fp8 = None
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config.fp8 = value


def calibrate(model: BuiltModel, batch: TokenBatch, micro_batch_size: int) -> None:
    """Fills a delayed-scaling model's amax history from ``batch`` and turns it into scales,
    before the model's first scored pass (GPU, Transformer Engine).

    Two passes, as in TE's own calibration example (docs/examples/te_gemma): a pass in TE's
    calibration mode (``autocast(enabled=False, calibrating=True)``: high-precision GEMMs,
    amaxes recorded), then one FP8 pass with autograd enabled, whose exit from the FP8 region
    recomputes the scales from the history; its outputs are thrown away. The FP8 recipe and
    amax-reduction group are Megatron's own (the ones its forward passes use), so the modules'
    FP8 metadata is not re-initialised at the first scored pass. Megatron-LM, NeMo-RL, verl and
    slime have no such step (their FP8 paths train from scratch or accept the first step's
    scales); TE's inference examples do it before serving a model in FP8.
    """
    import transformer_engine.pytorch as te
    from megatron.core.fp8_utils import get_fp8_recipe

    recipe = get_fp8_recipe(model.config)
    group = distributed.fp8_amax_reduction_group(model.config.tp_only_amax_red)
    autocast = getattr(te, "autocast", None)
    calibrating = (autocast(enabled=False, calibrating=True, recipe=recipe, amax_reduction_group=group)
                   if autocast is not None  # TE >= 2.8 renamed fp8_autocast
                   else te.fp8_autocast(enabled=False, calibrating=True, fp8_recipe=recipe, fp8_group=group))
    with fp8_off(model), calibrating:  # Megatron opens no FP8 region of its own inside
        forward_only(model, batch, micro_batch_size)
    with torch.enable_grad():
        # Frozen weights build no graph; a trainable model's graph is dropped with the outputs.
        forward_outputs(model, batch, micro_batch_size)
