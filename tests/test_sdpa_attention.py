"""SDPA core attention (models/attention.py) against Megatron's unfused DotProductAttention.

Same inputs, same numbers: the module alone (GQA, a passed causal mask, no mask, a packed
block-causal mask; outputs and gradients), then a whole Qwen2 policy built each way from the
same weights (log-probs and a loss's gradients through the trainer's schedule, right-padded
and packed rows). float32 on CPU; the GPU test does the same in bf16 on CUDA.

Megatron's parallel state lives in a subprocess, as in tests/test_plan.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch import REPO

WORKER = r'''
import json, sys
import torch
from megatron_prime import distributed
from megatron_prime.config import ParallelConfig, PrecisionConfig
from megatron_prime.models.builder import build_model
from megatron_prime.models.schedule import TokenBatch, forward_backward, forward_only
from megatron_prime.toy import write_toy_model

device = sys.argv[1]
dtype = torch.float32 if device == "cpu" else torch.bfloat16
distributed.init_distributed(ParallelConfig(), use_gpu=device == "cuda")
out = {}

# ---- the module alone ----
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_prime.models.attention import SDPACoreAttention

config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                           kv_channels=16, attention_dropout=0.0, params_dtype=dtype,
                           bf16=dtype == torch.bfloat16, attention_softmax_in_fp32=True)
unfused = DotProductAttention(config, 1, AttnMaskType.causal, "self")
sdpa = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
gen = torch.Generator().manual_seed(0)
seq, batch = 9, 3
def inputs():
    q = torch.randn(seq, batch, 4, 16, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(seq, batch, 2, 16, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(seq, batch, 2, 16, generator=gen).to(device, dtype).requires_grad_()
    return q, k, v
causal = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1).view(1, 1, seq, seq)
segments = torch.tensor([[1] * 4 + [2] * 5, [1] * 9, [1] * 3 + [2] * 3 + [0] * 3], device=device)
packed = (causal[0] | (segments.unsqueeze(2) != segments.unsqueeze(1))).unsqueeze(1)
gaps = {}
for name, their_mask, our_mask in (("causal_mask", causal, causal), ("no_mask", causal, None),
                                   ("packed", packed, packed)):
    q, k, v = inputs()
    theirs = unfused(q, k, v, their_mask)
    grads_theirs = torch.autograd.grad(theirs.float().square().sum(), (q, k, v))
    ours = sdpa(q, k, v, our_mask)
    grads_ours = torch.autograd.grad(ours.float().square().sum(), (q, k, v))
    rows = segments != 0 if name == "packed" else torch.ones(batch, seq, dtype=torch.bool, device=device)
    keep = rows.T.unsqueeze(-1)  # fully masked rows (padding) have no defined output
    gaps[name] = {"shape": list(ours.shape) == list(theirs.shape),
                  "out": ((ours - theirs).float().abs() * keep).max().item(),
                  "grad": max((a - b).float().abs().max().item() for a, b in zip(grads_ours, grads_theirs)),
                  "grad_scale": max(g.float().abs().max().item() for g in grads_theirs)}
out["module"] = gaps

# ---- a whole policy, each way, from the same weights ----
folder = write_toy_model(sys.argv[2], num_layers=2, num_key_value_heads=2)
hf_config = json.loads((folder / "config.json").read_text())
models = {}
for attention in ("unfused", "sdpa"):
    torch.manual_seed(0)
    precision = PrecisionConfig(layer_spec="local", local_attention=attention,
                                dtype="float32" if device == "cpu" else "bfloat16")
    models[attention] = build_model(hf_config, "policy", ParallelConfig(), precision)
models["sdpa"].chunks[0].load_state_dict(models["unfused"].chunks[0].state_dict())
out["implicit_mask"] = {name: m.causal_mask_implicit for name, m in models.items()}
gen = torch.Generator().manual_seed(1)
ids = torch.randint(3, 200, (4, 24), generator=gen)
mask = torch.zeros(4, 24, dtype=torch.long)
for row, (start, end) in enumerate([(6, 24), (5, 15), (8, 20), (4, 9)]):
    mask[row, start:end] = 1
padded = TokenBatch(ids, mask)
packed_batch = TokenBatch(ids, mask, segment_ids=torch.tensor([[1] * 12 + [2] * 12] * 2 + [[1] * 24] * 2))
def loss_fn(outputs, micro):
    scored = micro.scored_token_mask()
    loss = -(outputs.logprobs * scored).sum() + 0.1 * (outputs.entropy * scored).sum()
    return loss, scored.sum().to(torch.int), {}
results = {}
for name, model in models.items():
    per_layout = {}
    for layout, tokens in (("padded", padded), ("packed", packed_batch)):
        logprobs = forward_only(model, tokens, micro_batch_size=2).logprobs.float().cpu()
        for chunk in model.chunks:
            chunk.zero_grad_buffer()
        metrics = forward_backward(model, tokens, 2, loss_fn)
        grads = torch.cat([p.main_grad.float().flatten().cpu() for p in model.chunks[0].parameters()])
        per_layout[layout] = (logprobs, metrics["loss"], grads)
    results[name] = per_layout
out["model"] = {layout: {"logprob_gap": (results["sdpa"][layout][0] - results["unfused"][layout][0]).abs().max().item(),
                         "loss": [results["unfused"][layout][1], results["sdpa"][layout][1]],
                         "grad_gap": (results["sdpa"][layout][2] - results["unfused"][layout][2]).abs().max().item(),
                         "grad_scale": results["unfused"][layout][2].abs().max().item()}
                for layout in ("padded", "packed")}
print(json.dumps(out))
distributed.destroy_distributed()
'''


def run_worker(device: str, tmp_path) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, device, str(tmp_path / "model")],
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(result: dict, tolerance: float, loss_tolerance: float) -> None:
    for name, gap in result["module"].items():
        assert gap["shape"], name
        assert gap["out"] < tolerance, (name, gap)
        assert gap["grad"] < tolerance * max(1.0, gap["grad_scale"]), (name, gap)
    # Only SDPA lets the schedule drop the causal mask.
    assert result["implicit_mask"] == {"unfused": False, "sdpa": True}
    for layout, gap in result["model"].items():
        assert gap["logprob_gap"] < loss_tolerance, (layout, gap)
        unfused_loss, sdpa_loss = gap["loss"]
        assert abs(unfused_loss - sdpa_loss) < loss_tolerance, (layout, gap)
        assert gap["grad_gap"] < loss_tolerance * max(1.0, gap["grad_scale"]), (layout, gap)


def test_sdpa_attention_equals_megatrons_unfused_attention_on_cpu(tmp_path):
    check(run_worker("cpu", tmp_path), tolerance=1e-5, loss_tolerance=1e-5)


@pytest.mark.gpu
def test_sdpa_attention_equals_megatrons_unfused_attention_on_cuda(tmp_path, keep_result):
    result = run_worker("cuda", tmp_path)
    keep_result("gaps", result)
    # bf16: the two kernels round differently (flash attention accumulates in fp32 blocks).
    check(result, tolerance=5e-2, loss_tolerance=5e-2)
