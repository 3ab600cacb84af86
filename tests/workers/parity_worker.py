"""Run under torchrun by tests/test_parallel_parity.py: one layout, results to a file.

Builds a tiny random HF model (same seed in every layout), loads it into Megatron policy
and reference models at the requested TP/PP/DP layout, and records on global rank 0:
per-token log-probs and entropy (right-padded and packed), the step-0 loss, the grad norm
of one forward-backward, the loss after one optimizer step, and whether the reference moved.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_mapping import load_hf_weights
from megatron_prime.config import OptimizerConfig, ParallelConfig
from megatron_prime.models.builder import BuiltModel, build_model
from megatron_prime.models.optimizer import build_optimizer, train_step
from megatron_prime.algo import PPOLossConfig
from megatron_prime.losses import StepBatch, ppo_loss, prm_loss
from megatron_prime.models.schedule import TokenBatch, TokenOutputs, forward_backward, forward_only

ENTROPY_COEF = 0.1
# Rows of the test batch (total lengths) and how pack_rows pairs them.
ROW_LENGTHS = (16, 11, 14, 9)
PACKED_PAIRS = ((0, 3), (1, 2))
PACKED_SEQ = 25


def make_hf_model(arch: str):
    """Tiny random models: Qwen2 with QKV bias, GQA, untied; Llama with tied embeddings."""
    torch.manual_seed(0)
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
                             max_position_embeddings=128, architectures=["Qwen2ForCausalLM"])
        model = Qwen2ForCausalLM(config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                             tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=128, architectures=["LlamaForCausalLM"])
        model = LlamaForCausalLM(config)
    # Non-trivial norm weights and biases, so a mapping mix-up cannot hide behind ones/zeros.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return config, model.float().eval()


def make_batch(vocab_size: int) -> TokenBatch:
    """4 rows of prompt+response with different prompt and response lengths, right-padded."""
    generator = torch.Generator().manual_seed(1)
    seq = 16
    input_ids = torch.randint(0, vocab_size, (4, seq), generator=generator)
    response_mask = torch.zeros(4, seq)
    prompt_lengths = (5, 3, 7, 4)
    for row, (prompt_len, total_len) in enumerate(zip(prompt_lengths, ROW_LENGTHS)):
        response_mask[row, prompt_len:total_len] = 1
        input_ids[row, total_len:] = 0
    return TokenBatch(input_ids, response_mask)


def pack_tensor(per_row: torch.Tensor) -> torch.Tensor:
    """Packs rows 0+3 and 1+2 (lengths 16+9 and 11+14) of a [4, 16] tensor into [2, 25]."""
    packed = per_row.new_zeros(len(PACKED_PAIRS), PACKED_SEQ)
    for out_row, pair in enumerate(PACKED_PAIRS):
        start = 0
        for row in pair:
            length = ROW_LENGTHS[row]
            packed[out_row, start:start + length] = per_row[row, :length]
            start += length
    return packed


def pack_rows(batch: TokenBatch) -> TokenBatch:
    """The right-padded batch as two packed rows, each holding two sequences."""
    segments = pack_tensor(torch.tensor([[1] * 16, [1] * 16, [2] * 16, [2] * 16]))
    return TokenBatch(pack_tensor(batch.input_ids), pack_tensor(batch.response_mask),
                      segment_ids=segments)


def prime_extras(batch: TokenBatch) -> dict[str, torch.Tensor]:
    """Fixed synthetic old/ref log-probs, advantages and labels for the PRIME losses."""
    generator = torch.Generator().manual_seed(5)
    shape = batch.input_ids.shape
    mask = batch.response_mask
    return {
        "old_logprobs": -(5.0 + torch.rand(shape, generator=generator)) * mask,
        "advantages": torch.randn(shape, generator=generator) * mask,
        "ref_logprobs": -(5.0 + torch.rand(shape, generator=generator)) * mask,
        "outcome_labels": torch.tensor([1.0, 0.0, 1.0, 0.0]),
    }


def nll_with_entropy_bonus(outputs: TokenOutputs, micro_batch: TokenBatch):
    mask = micro_batch.scored_token_mask(outputs.logprobs.dtype)
    loss_sum = -(outputs.logprobs * mask).sum() - ENTROPY_COEF * (outputs.entropy * mask).sum()
    return loss_sum, mask.sum().to(torch.int), {}


def params_checksum(model: BuiltModel) -> float:
    return float(sum(p.double().abs().sum() for chunk in model.gpt_chunks() for p in chunk.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="qwen2")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
                              virtual_pipeline_parallel_size=args.vpp)
    hf_config, hf_model = make_hf_model(args.arch)
    distributed.init_distributed(parallel, seed=1234)
    policy = build_model(hf_config, "policy", parallel,
                         use_distributed_optimizer=args.distributed_optimizer)
    reference = build_model(hf_config, "reference", parallel)
    load_hf_weights(policy, hf_model.state_dict())
    load_hf_weights(reference, hf_model.state_dict())

    batch = make_batch(hf_config.vocab_size)
    # Each DP rank takes its own rows, as the trainer will.
    rows_per_dp = batch.batch_size // distributed.dp_world_size()
    first = distributed.dp_rank() * rows_per_dp
    extras = prime_extras(batch)
    rows = slice(first, first + rows_per_dp)
    local = StepBatch(batch.input_ids[rows], batch.response_mask[rows],
                      old_logprobs=extras["old_logprobs"][rows],
                      advantages=extras["advantages"][rows],
                      ref_logprobs=extras["ref_logprobs"][rows],
                      outcome_rewards=extras["outcome_labels"][rows])
    micro_batch_size = min(args.micro_batch_size, rows_per_dp)

    outputs = forward_only(policy, local, micro_batch_size)
    packed = forward_only(policy, pack_rows(batch), 1) if distributed.dp_world_size() == 1 else None
    ref_checksum = params_checksum(reference)
    ref_outputs = forward_only(reference, local, micro_batch_size)

    optimizer = build_optimizer(policy, OptimizerConfig(
        lr=1e-3, clip_grad=1.0, use_distributed_optimizer=args.distributed_optimizer))
    # PRIME's losses through the schedule (no update): loss and gradient norm of each.
    prime = {}
    for name, loss_fn in (("ppo", ppo_loss(PPOLossConfig())), ("prm", prm_loss(beta=0.05))):
        for chunk in policy.chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()  # prepare_grads aliased param.grad to the grad buffer
        metrics = forward_backward(policy, local, micro_batch_size, loss_fn)
        optimizer.prepare_grads()
        prime[name] = {**metrics, "grad_norm": float(optimizer.get_grad_norm())}
    step0 = train_step(policy, optimizer, local, micro_batch_size, nll_with_entropy_bonus)
    step1 = train_step(policy, optimizer, local, micro_batch_size, nll_with_entropy_bonus)
    reference_unchanged = params_checksum(reference) == ref_checksum
    frozen_error = ""
    try:
        build_optimizer(reference, OptimizerConfig())
    except ValueError as error:
        frozen_error = str(error)

    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, {
        "dp_rank": distributed.dp_rank(),
        "logprobs": outputs.logprobs.tolist(),
        "entropy": outputs.entropy.tolist(),
    })
    if torch.distributed.get_rank() == 0:
        by_dp = {g["dp_rank"]: g for g in gathered}
        result = {
            "logprobs": sum((by_dp[r]["logprobs"] for r in sorted(by_dp)), []),
            "entropy": sum((by_dp[r]["entropy"] for r in sorted(by_dp)), []),
            "packed_logprobs": None if packed is None else packed.logprobs.tolist(),
            "ref_logprobs_equal_policy": bool(torch.equal(ref_outputs.logprobs, outputs.logprobs)),
            "loss0": step0.metrics["loss"],
            "grad_norm0": step0.grad_norm,
            "loss1": step1.metrics["loss"],
            "num_units0": step0.metrics["num_units"],
            "reference_unchanged": reference_unchanged,
            "frozen_optimizer_error": frozen_error,
            "prime": prime,
        }
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
