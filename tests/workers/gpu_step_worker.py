"""Run by tests/test_gpu_prime_step.py (torchrun, one process): one PRIME step on a device.

Modes:
  sample  draw the step's fixed batch: 2 prompts x 4 responses of RESPONSE_TOKENS tokens,
          either from vLLM (``--rollout-source vllm``: the tiny HF model saved to --model-dir,
          sampled by a vLLM engine in this process) or from a plain sampler over the Megatron
          policy itself (``--rollout-source policy``: a few tokens drawn autoregressively from
          the policy's logits, one full forward per token). The tokens and the sampler's
          log-probs are written to --batch (torch.save).
  step    build policy, PRM and reference with ``train.build_prime_models`` (TP=1, Megatron's
          local layer spec; bf16 on cuda, float32 on cpu), record the policy's per-token
          log-probs of the batch, run ``update.prime_update`` on it, and write the metrics,
          the log-probs and per-HF-tensor sums of the updated policy and PRM to --out.

The batch goes to ``prime_update`` on the host, as rollout/collect.py hands it over in the
trainer. Sampling and the step are separate processes so that the CPU float32 reference run
reads the very tokens the GPU sampled, and so that vLLM's engine never shares a process with
the trainer's process groups.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

NUM_SAMPLES = 4
PROMPTS = ([5, 17, 42, 8, 99, 3], [250, 7, 64, 12])  # token ids; lengths 6 and 4
RESPONSE_TOKENS = 10
OUTCOMES = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]  # fixed outcome rewards, 2 per group right
SEED = 7


def make_hf_model():
    """A tiny random Qwen2 (GQA, q/k/v bias, untied) with head_dim 64, which vLLM's GPU and CPU
    attention backends both accept; float32, the same weights in every process."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=320, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=128, architectures=["Qwen2ForCausalLM"])
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # non-trivial norms and biases, as in parity_worker
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return config, model.float().eval()


def precision_for(device: str):
    from megatron_prime.config import PrecisionConfig

    # The GPU test machine has no Transformer Engine: Megatron's local layers, in bf16.
    return PrecisionConfig(dtype="bfloat16" if device == "cuda" else "float32", layer_spec="local")


def prime_config(device: str):
    from megatron_prime.config import OptimizerConfig
    from megatron_prime.train import PrimeConfig
    from megatron_prime.update import AlgoConfig

    return PrimeConfig(precision=precision_for(device),
                       algo=AlgoConfig(micro_batch_size=2, num_samples_per_prompt=NUM_SAMPLES),
                       policy_optimizer=OptimizerConfig(lr=1e-3),
                       prm_optimizer=OptimizerConfig(lr=1e-3))


# ---- sampling ----

def sample_with_policy(device: str) -> tuple[list[list[int]], list[list[float]]]:
    """Responses drawn token by token from the Megatron policy's own logits (temperature 1,
    a seeded CPU generator, so a rerun draws the same tokens)."""
    from megatron_prime import distributed
    from megatron_prime.checkpoint.hf_mapping import load_hf_weights
    from megatron_prime.config import ParallelConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.models.schedule import TokenBatch

    distributed.init_distributed(ParallelConfig(), seed=SEED, use_gpu=device == "cuda")
    hf_config, hf_model = make_hf_model()
    policy = build_model(hf_config, "policy", ParallelConfig(), precision_for(device))
    load_hf_weights(policy, hf_model.state_dict())
    policy.eval()
    [gpt] = policy.gpt_chunks()
    generator = torch.Generator().manual_seed(SEED)
    responses, logprobs = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            rows = torch.tensor([prompt] * NUM_SAMPLES, device=distributed.device())
            row_logprobs: list[torch.Tensor] = []
            for _ in range(RESPONSE_TOKENS):
                batch = TokenBatch(rows, torch.ones_like(rows, dtype=torch.float32))
                logits = gpt(rows, batch.position_ids(), batch.attention_mask())  # [b, s, V]
                last = logits[:, -1, :hf_config.vocab_size].float().log_softmax(-1).cpu()
                token = torch.multinomial(last.exp(), 1, generator=generator)  # [b, 1]
                row_logprobs.append(last.gather(1, token))
                rows = torch.cat([rows, token.to(rows.device)], dim=1)
            responses += rows[:, len(prompt):].cpu().tolist()
            logprobs += torch.cat(row_logprobs, dim=1).tolist()
    distributed.destroy_distributed()
    return responses, logprobs


def sample_with_vllm(model_dir: Path, device: str) -> tuple[list[list[int]], list[list[float]]]:
    """The same tiny model saved as an HF folder and sampled by vLLM (no tokenizer: token ids
    in, token ids and their sampled log-probs out)."""
    from vllm import LLM, SamplingParams

    _, hf_model = make_hf_model()
    hf_model.save_pretrained(model_dir)
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, seed=SEED, enforce_eager=True,
              dtype="bfloat16" if device == "cuda" else "float32",
              gpu_memory_utilization=0.3, max_model_len=64)
    params = SamplingParams(n=NUM_SAMPLES, max_tokens=RESPONSE_TOKENS, min_tokens=RESPONSE_TOKENS,
                            ignore_eos=True, temperature=1.0, logprobs=0,
                            detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    responses, logprobs = [], []
    for output in outputs:
        for completion in output.outputs:
            ids = list(completion.token_ids)
            responses.append(ids)
            logprobs.append([step[token].logprob for token, step in zip(ids, completion.logprobs)])
    return responses, logprobs


def right_padded_batch(responses: list[list[int]], logprobs: list[list[float]]) -> dict[str, Any]:
    """Prompt + response rows, right-padded with 0; the response mask and the sampler's
    log-probs at the response tokens (extras key ``rollout_logprobs``, as the trainer's)."""
    prompts = [p for p in PROMPTS for _ in range(NUM_SAMPLES)]
    seq = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.zeros(len(prompts), seq, dtype=torch.long)
    mask = torch.zeros(len(prompts), seq)
    sampled = torch.zeros(len(prompts), seq)
    for row, (prompt, response, lps) in enumerate(zip(prompts, responses, logprobs)):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response)
        mask[row, len(prompt):end] = 1
        sampled[row, len(prompt):end] = torch.tensor(lps)
    return {"input_ids": input_ids, "response_mask": mask, "rollout_logprobs": sampled}


# ---- the step ----

def weight_sums(model) -> dict[str, list[float]]:
    from megatron_prime import distributed
    from megatron_prime.checkpoint.hf_mapping import iter_hf_tensors

    return {name: [float(t.double().sum()), float(t.double().abs().sum())]
            for name, t in iter_hf_tensors(model.gpt_chunks(), model.shape,
                                           distributed.gather_tp_shards)}


def run_step(batch_file: Path, device: str) -> dict[str, Any]:
    from megatron_prime import distributed
    from megatron_prime.checkpoint.hf_mapping import load_hf_weights
    from megatron_prime.models.schedule import TokenBatch, forward_only
    from megatron_prime.train import SftCheckpoint, build_prime_models
    from megatron_prime.update import prime_update

    config = prime_config(device)
    runtime = distributed.init_distributed(config.parallel, seed=SEED, use_gpu=device == "cuda")
    hf_config, hf_model = make_hf_model()
    state = hf_model.state_dict()
    # No folder: the PRM and reference start from the policy's weights (model.prm_path unset).
    start = SftCheckpoint(hf_config, Path(), lambda model: load_hf_weights(model, state))
    models = build_prime_models(config, start)
    saved = torch.load(batch_file, weights_only=True)
    batch = TokenBatch(saved["input_ids"], saved["response_mask"],
                       extras={"rollout_logprobs": saved["rollout_logprobs"]})
    old = forward_only(models.policy, batch, config.algo.micro_batch_size).logprobs
    update = prime_update(models, batch, torch.tensor(OUTCOMES), config.algo)
    result = {
        "device": str(runtime.device),
        "device_name": torch.cuda.get_device_name() if runtime.on_gpu else "cpu",
        "param_dtype": str(next(models.policy.gpt_chunks()[0].parameters()).dtype),
        "metrics": update.metrics,
        "skip_reasons": update.skip_reasons,
        "old_logprobs": (old.float().cpu() * batch.response_mask).tolist(),
        "policy": weight_sums(models.policy),
        "prm": weight_sums(models.prm),
    }
    distributed.destroy_distributed()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("sample", "step"))
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--rollout-source", choices=("vllm", "policy"), default="policy")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--batch", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "sample":
        if args.rollout_source == "vllm":
            responses, logprobs = sample_with_vllm(args.model_dir, args.device)
        else:
            responses, logprobs = sample_with_policy(args.device)
        torch.save(right_padded_batch(responses, logprobs), args.batch)
        args.out.write_text(json.dumps({"responses": responses, "logprobs": logprobs}))
    else:
        args.out.write_text(json.dumps(run_step(args.batch, args.device)))


if __name__ == "__main__":
    main()
