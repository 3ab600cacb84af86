"""Per-token log-probs and entropy from vocab-parallel logits, without gathering the vocabulary.

Each TP rank holds logits for its slice of the (padded) vocabulary. Like Megatron's
vocab-parallel cross-entropy, we all-reduce three per-token scalars across the TP group
(max, sum of exponentials, the target's logit) plus one for the entropy, so a rank never
holds more than its own ``[tokens, vocab / TP]`` slice. Rows of the padded vocabulary (ids >=
the real vocabulary size) are masked out, so results equal an unpadded HF model's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_prime import distributed


class _VocabParallelLogProbEntropy(torch.autograd.Function):
    """Returns (log p(target), entropy) per token; gradients flow for both.

    The loss built on these outputs is identical on every TP rank, so the gradient with
    respect to the local logits slice is the local part of the full-vocab gradient:
    d logp/d l_v = 1[v = target] - p_v and d H/d l_v = -p_v (log p_v + H).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, vocab_start: int, vocab_size: int,
                group: dist.ProcessGroup | None, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        ctx.logits_dtype = logits.dtype
        ctx.temperature = temperature
        if logits.dtype == torch.float32:
            # The model's own output: divide out of place (it may be saved for its backward).
            logits = logits / temperature if temperature != 1.0 else logits
        else:
            # .float() already made a private copy: divide it in place (verl's logits.div_).
            logits = logits.float()
            if temperature != 1.0:
                logits.div_(temperature)
        local_vocab = logits.shape[-1]
        vocab_ids = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
        padded = vocab_ids >= vocab_size
        if bool(padded.any()):  # host sync on a tiny tensor; false except on the last TP rank
            logits = logits.masked_fill(padded, float("-inf"))

        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)

        local_target = target - vocab_start
        in_range = (local_target >= 0) & (local_target < local_vocab)
        local_target = local_target.clamp(0, local_vocab - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(in_range, target_logit, torch.zeros_like(target_logit))
        dist.all_reduce(target_logit, group=group)

        log_sum_exp = sum_exp.log()
        logprobs = target_logit - log_sum_exp
        probs = exp_logits.div_(sum_exp.unsqueeze(-1))
        # sum_v p_v * shifted_v, with 0 * (-inf) of padded rows taken as 0.
        expected_shifted = torch.where(padded, torch.zeros_like(probs), probs * shifted).sum(-1)
        dist.all_reduce(expected_shifted, group=group)
        entropy = log_sum_exp - expected_shifted

        ctx.save_for_backward(probs, entropy, local_target, in_range)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, grad_entropy: Tensor):
        probs, entropy, local_target, in_range = ctx.saved_tensors
        grad = probs * (-grad_logprobs).unsqueeze(-1)
        target_grad = torch.where(in_range, grad_logprobs, torch.zeros_like(grad_logprobs))
        grad.scatter_add_(-1, local_target.unsqueeze(-1), target_grad.unsqueeze(-1))
        if grad_entropy is not None:
            log_probs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
            grad = grad - grad_entropy.unsqueeze(-1) * probs * (log_probs + entropy.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)  # chain rule through logits / temperature
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits: Tensor, target: Tensor, vocab_size: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """log p(target) and the entropy of each position's distribution, both float32.

    ``logits`` is this TP rank's vocabulary slice ``[..., padded_vocab / TP]``; ``target``
    holds global token ids ``[...]``; ``vocab_size`` is the real (unpadded) vocabulary.
    The distribution is ``softmax(logits / temperature)``: the one vLLM samples from at
    that temperature, so the trainer's ratios compare like with like (verl divides the
    logits the same way).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} is not allowed here; need a value > 0 "
                         "(greedy decoding has no log-probs to train on)")
    local_vocab = logits.shape[-1]
    vocab_start = distributed.tp_rank() * local_vocab
    return _VocabParallelLogProbEntropy.apply(
        logits, target, vocab_start, vocab_size, distributed.tp_group(), temperature
    )


def token_logprobs_and_entropy(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor, vocab_size: int,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Aligned per-token outputs ``[batch, seq]``: position t scores ``input_ids[:, t]``.

    Position t's log-prob comes from the logits at t-1 (next-token prediction); position 0
    and every position outside ``response_mask`` (prompt, padding, other packed sequences'
    boundaries) are 0. Works for right-padded and packed rows alike.
    """
    logprobs, entropy = vocab_parallel_logprobs_and_entropy(
        logits[:, :-1], input_ids[:, 1:], vocab_size, temperature
    )
    mask = response_mask[:, 1:].to(logprobs.dtype)
    zero_column = logprobs.new_zeros(logprobs.shape[0], 1)
    logprobs = torch.cat([zero_column, logprobs * mask], dim=1)
    entropy = torch.cat([zero_column, entropy * mask], dim=1)
    return logprobs, entropy
