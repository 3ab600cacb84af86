"""One training step of a ~1.5B Qwen2-shaped policy on one GPU: tokens/s, MFU, peak memory.

The real trainer's path: ``build_model`` (Megatron GPTModel in DDP, distributed optimizer),
``build_optimizer`` and ``train_step`` (Megatron's forward-backward schedule, vocab-parallel
log-probs and entropy, Adam), plus ``forward_only`` (what the reference and PRM log-prob
passes cost). bf16 with Megatron's local layer spec (``precision.layer_spec=local``): the
machine it was written for has no Transformer Engine. Its core attention is either torch's
fused SDPA kernel (``precision.local_attention=sdpa``, the default; models/attention.py) or
Megatron's unfused module (it stores the s x s softmax), both measured in the same run.

After the timed steps, the trainer's state is released as around a rollout
(models/offload.py: grad buffers released, Adam state and fp32 main weights to pinned host
memory) and restored: the bytes it frees (by its count and by the allocator's), and how long
release and restore take (``offload_*`` in the JSON; host-to-device bandwidth in GB/s).

Each setting (activation recompute x attention) runs in its own process, one after the
other, in this one invocation, so the printed ratios compare like with like. Memory: ``static`` is what is allocated between
steps (weights, fp32 main grads, Adam state); ``peak`` the high-water mark during a step.
The JSON written with ``--out`` keeps the model shape, so the planner's estimate for the
same run can be set beside it (megatron-prime-plan).

    python benchmarks/bench_gpu_train_step.py --out result.json            # GPU
    python benchmarks/bench_gpu_train_step.py --tiny --device cpu          # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch

# bf16 dense peak of one H100 SXM (NVIDIA's datasheet figure without sparsity).
H100_BF16_PEAK_FLOPS = 989.4e12


def qwen2_5_1_5b(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=352,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=4096, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    # Qwen/Qwen2.5-1.5B config.json.
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])


@dataclass
class Measurement:
    recompute: str
    attention: str
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    params: int
    step_seconds: float
    tokens_per_second: float
    model_tflops_per_second: float
    mfu: float
    forward_only_tokens_per_second: float
    static_bytes: int
    peak_bytes: int
    peak_minus_static_bytes: int
    loss_first: float
    loss_last: float
    offload_released_bytes: int = 0  # grads + optimizer state, by RolloutOffload's count
    offload_allocator_drop_bytes: int = 0  # what torch's allocator gave up (0 on CPU)
    offload_release_seconds: float = 0.0
    offload_restore_seconds: float = 0.0


def model_flops_per_token(shape, seq_length: int) -> float:
    """Training FLOPs per token, fwd + bwd = 3 x fwd, Megatron's convention: 2 FLOPs per
    weight per token for every GEMM (attention projections, MLP, output layer) plus the
    attention scores and weighted sum (4 s d per layer, counted without the causal half).
    Recomputation is not counted: this is model FLOPs (MFU), not hardware FLOPs."""
    h, layers = shape.hidden_size, shape.num_layers
    q_dim = shape.num_attention_heads * shape.head_dim
    kv_dim = shape.num_query_groups * shape.head_dim
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * shape.ffn_hidden_size
    gemm_weights = layers * per_layer + h * shape.vocab_size
    attention = layers * 2 * seq_length * q_dim
    return 3 * 2 * (gemm_weights + attention)


def measure(hf_config, recompute: str, attention: str, args, device: torch.device) -> Measurement:
    from megatron_prime.config import OptimizerConfig, ParallelConfig, PrecisionConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.models.optimizer import build_optimizer, sequence_nll_loss, train_step
    from megatron_prime.models.schedule import TokenBatch, forward_only

    # TP=PP=1 as the runtime was started; only the recompute setting changes.
    parallel = ParallelConfig(recompute_granularity=recompute)
    precision = PrecisionConfig(dtype="bfloat16" if device.type == "cuda" else "float32",
                                layer_spec="local", local_attention=attention)
    from megatron.core import tensor_parallel

    # The same initial weights for every setting: recomputation must not change the losses.
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_model(hf_config, "policy", parallel, precision, use_distributed_optimizer=True)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5, use_distributed_optimizer=True,
                                                       clip_grad=1.0))
    params = sum(p.numel() for chunk in model.chunks for p in chunk.parameters())
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, hf_config.vocab_size, (args.global_batch, args.seq), generator=generator)
    mask = torch.ones_like(input_ids, dtype=torch.float32)
    mask[:, : args.seq // 4] = 0  # a prompt quarter that is not scored, as in PRIME
    batch = TokenBatch(input_ids=input_ids.to(device), response_mask=mask.to(device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses = []
    for _ in range(args.warmup):
        losses.append(train_step(model, optimizer, batch, args.micro_batch, sequence_nll_loss).metrics["loss"])
    sync()
    static = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(train_step(model, optimizer, batch, args.micro_batch, sequence_nll_loss).metrics["loss"])
    sync()
    step_seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0

    start = time.perf_counter()
    for _ in range(args.steps):
        forward_only(model, batch, args.micro_batch)
    sync()
    forward_seconds = (time.perf_counter() - start) / args.steps

    # The rollout offload: release (copies to pinned host memory, one sync), then restore
    # (asynchronous copies back; the sync here makes the time the copies' own).
    from megatron_prime.models.offload import RolloutOffload

    offload = RolloutOffload([(model, optimizer)])
    offload.release()  # the first release pins its host buffers; time the second
    offload.restore()
    sync()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    released = offload.release()
    sync()
    drop = before - torch.cuda.memory_allocated() if device.type == "cuda" else 0
    start = time.perf_counter()
    offload.restore()
    sync()
    restore_seconds = time.perf_counter() - start

    if getattr(args, "profile", None):
        profile(partial(train_step, model, optimizer, batch, args.micro_batch, sequence_nll_loss),
                args.profile)
        profile(partial(forward_only, model, batch, args.micro_batch), args.profile + ".forward")

    tokens = args.global_batch * args.seq
    flops = model_flops_per_token(model.shape, args.seq) * tokens / step_seconds
    result = Measurement(
        recompute=recompute, attention=attention, seq_length=args.seq, micro_batch_size=args.micro_batch,
        global_batch_size=args.global_batch, params=params, step_seconds=step_seconds,
        tokens_per_second=tokens / step_seconds, model_tflops_per_second=flops / 1e12,
        mfu=flops / H100_BF16_PEAK_FLOPS, forward_only_tokens_per_second=tokens / forward_seconds,
        static_bytes=static, peak_bytes=peak, peak_minus_static_bytes=peak - static,
        loss_first=losses[0], loss_last=losses[-1],
        offload_released_bytes=released.total_bytes, offload_allocator_drop_bytes=drop,
        offload_release_seconds=released.release_seconds, offload_restore_seconds=restore_seconds)
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def profile(model_step, path: str) -> None:
    """Where one call's time goes, by operator (CUDA time first), to a text file."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        model_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    with open(path, "w") as file:
        file.write(prof.key_averages().table(sort_by=sort, row_limit=25))
        file.write("\n")
        file.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def run_one(args) -> None:
    """One recompute setting in this process (a fresh CUDA context: nothing of another
    setting's model stays allocated)."""
    from megatron_prime import distributed
    from megatron_prime.config import ParallelConfig

    runtime = distributed.init_distributed(ParallelConfig(), use_gpu=args.device == "cuda")
    hf_config = qwen2_5_1_5b(args.tiny)
    try:
        result = asdict(measure(hf_config, args.recompute, args.attention, args, runtime.device))
    except torch.OutOfMemoryError as error:
        result = {"recompute": args.recompute, "attention": args.attention,
                  "error": str(error).splitlines()[0]}
    with open(args.out, "w") as file:
        json.dump(result, file)
    distributed.destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--recompute", default="none,selective,full")
    parser.add_argument("--attention", default="sdpa,unfused",
                        help="the local spec's core attention(s), each with every recompute setting")
    parser.add_argument("--profile", help="write an operator profile of one step of the first "
                        "setting to this file")
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        run_one(args)
        return

    hf_config = qwen2_5_1_5b(args.tiny)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# {device_name}, torch {torch.__version__}; {args.global_batch} x {args.seq} tokens/step, "
          f"micro-batch {args.micro_batch}")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        settings = [(attention, recompute) for attention in args.attention.split(",")
                    for recompute in args.recompute.split(",")]
        for index, (attention, recompute) in enumerate(settings):
            label = f"attention={attention:7s} recompute={recompute:9s}"
            out = os.path.join(scratch, f"{attention}_{recompute}.json")
            command = [sys.executable, __file__, "--single", "--recompute", recompute,
                       "--attention", attention, "--out", out,
                       "--device", args.device, "--seq", str(args.seq),
                       "--micro-batch", str(args.micro_batch), "--global-batch", str(args.global_batch),
                       "--warmup", str(args.warmup), "--steps", str(args.steps)]
            if args.tiny:
                command.append("--tiny")
            if args.profile and index == 0:
                command += ["--profile", args.profile]
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29533 + index)}
            subprocess.run(command, env=env, check=True)
            result = json.loads(open(out).read())
            results.append(result)
            if "error" in result:
                print(f"{label} out of memory: {result['error']}", flush=True)
                continue
            print(f"{label} {result['params'] / 1e9:.3f}B params  "
                  f"{result['step_seconds'] * 1e3:8.1f} ms/step  {result['tokens_per_second']:9.0f} tokens/s  "
                  f"{result['model_tflops_per_second']:6.1f} TFLOP/s  MFU {result['mfu']:.3f}  "
                  f"fwd-only {result['forward_only_tokens_per_second']:9.0f} tokens/s  "
                  f"static {result['static_bytes'] / 2**30:6.2f} GiB  peak {result['peak_bytes'] / 2**30:6.2f} GiB  "
                  f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}", flush=True)
            moved = result["offload_released_bytes"]
            print(f"{label} rollout offload: {moved / 2**30:.2f} GiB released (allocator: "
                  f"{result['offload_allocator_drop_bytes'] / 2**30:.2f} GiB) in "
                  f"{result['offload_release_seconds']:.3f} s, restored in "
                  f"{result['offload_restore_seconds']:.3f} s", flush=True)
    measured = [r for r in results if "error" not in r]
    for result in measured[1:]:
        base = measured[0]
        print(f"ratio {result['attention']}+{result['recompute']} / {base['attention']}+"
              f"{base['recompute']}: tokens/s "
              f"{result['tokens_per_second'] / base['tokens_per_second']:.2f}, MFU "
              f"{result['mfu'] / base['mfu']:.2f}, peak-static "
              f"{result['peak_minus_static_bytes'] / max(base['peak_minus_static_bytes'], 1):.2f}")
    if args.out:
        shape = {key: getattr(hf_config, key) for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}
        with open(args.out, "w") as file:
            json.dump({"device": device_name, "torch": torch.__version__, "model": shape,
                       "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
