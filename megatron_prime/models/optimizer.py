"""Megatron's optimizer (optionally the distributed one) for a trainable model, and one step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from megatron_prime.config import OptimizerConfig
from megatron_prime.models.builder import BuiltModel
from megatron_prime.models.schedule import LossFn, MicroBatching, TokenBatch, forward_backward


def build_optimizer(model: BuiltModel, settings: OptimizerConfig) -> MegatronOptimizer:
    """Adam with grad clipping; the distributed optimizer shards its state over DP ranks."""
    if not model.trainable:
        raise ValueError(f"model role {model.role!r} is frozen and gets no optimizer")
    settings.validate()
    ddp_sharded = model.chunks[0].ddp_config.use_distributed_optimizer
    if settings.use_distributed_optimizer != ddp_sharded:
        raise ValueError(
            f"optimizer.use_distributed_optimizer={settings.use_distributed_optimizer} but the "
            f"model was built with use_distributed_optimizer={ddp_sharded}; expected the same value"
        )
    config = model.config
    megatron_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=settings.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(megatron_config, model.chunks)
    # Loss scaling (fp16 only) is applied by the schedule through this hook.
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


@dataclass
class StepResult:
    metrics: dict[str, float]
    grad_norm: float
    update_successful: bool
    # Why the update was skipped ("" when it was applied): the NaN/inf guard's reason.
    skip_reason: str = ""


def train_step(
    model: BuiltModel,
    optimizer: MegatronOptimizer,
    batch: TokenBatch,
    micro_batch_size: int | MicroBatching,
    loss_fn: LossFn,
    temperature: float = 1.0,
) -> StepResult:
    """Zero grads, accumulate over micro-batches, clip and step. The grad norm is pre-clip.

    ``temperature`` divides the logits before the loss reads log-probs (see forward_backward).

    Megatron's ``optimizer.step()`` is unrolled into its parts so that a non-finite loss or
    gradient norm skips the update instead of writing NaN into the weights: the loss and
    the norm are global (all-reduced) values, so every rank takes the same decision.
    """
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(model, batch, micro_batch_size, loss_fn, temperature)
    if not math.isfinite(metrics["loss"]):
        return StepResult(metrics, float("nan"), False, f"non-finite loss {metrics['loss']}")
    with torch.no_grad():
        # fp16 loss scaling: an overflow is found here and the step is skipped (scale drops).
        if optimizer.prepare_grads():
            return StepResult(metrics, float("nan"), False, "gradient overflow (fp16 loss scale)")
        norm = optimizer.get_grad_norm()  # global over DP/TP/PP
        grad_norm = float(norm)  # host sync: the skip decision is made on the host
        if not math.isfinite(grad_norm):
            return StepResult(metrics, grad_norm, False, f"non-finite gradient norm {grad_norm}")
        # A ChainedOptimizer (several param groups) clips each part by the one global norm.
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = part.get_parameters()
            if part.config.clip_grad > 0 and params:
                clip_grad_by_total_norm_fp32(
                    params, max_norm=part.config.clip_grad, total_norm=norm,
                    use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        update_successful = optimizer.step_with_ready_grads()
    return StepResult(metrics=metrics, grad_norm=grad_norm, update_successful=bool(update_successful))


def sequence_nll_loss(outputs, micro_batch: TokenBatch):
    """Token-sum negative log-likelihood over response tokens (the demo's and tests' SFT loss)."""
    mask = micro_batch.scored_token_mask(outputs.logprobs.dtype)
    loss_sum = -(outputs.logprobs * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"entropy": (outputs.entropy * mask).sum()}
