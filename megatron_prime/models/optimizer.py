"""Megatron's optimizer (optionally the distributed one) for a trainable model, and one step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

from megatron_prime.config import OptimizerConfig
from megatron_prime.models.builder import BuiltModel
from megatron_prime.models.schedule import LossFn, TokenBatch, forward_backward


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


def train_step(
    model: BuiltModel,
    optimizer: MegatronOptimizer,
    batch: TokenBatch,
    micro_batch_size: int,
    loss_fn: LossFn,
) -> StepResult:
    """Zero grads, accumulate over micro-batches, clip and step. The grad norm is pre-clip."""
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(model, batch, micro_batch_size, loss_fn)
    update_successful, grad_norm, _ = optimizer.step()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    return StepResult(metrics=metrics, grad_norm=grad_norm, update_successful=bool(update_successful))


def sequence_nll_loss(outputs, micro_batch: TokenBatch):
    """Token-sum negative log-likelihood over response tokens (the demo's and tests' SFT loss)."""
    mask = micro_batch.scored_token_mask(outputs.logprobs.dtype)
    loss_sum = -(outputs.logprobs * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"entropy": (outputs.entropy * mask).sum()}
