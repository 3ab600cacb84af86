"""The memory planner (megatron_prime/plan.py) against real Megatron models and hand counts.

Parameter counts, optimizer state and saved activations are measured on real GPTModels built
by ``build_model`` on CPU. That happens in a torchrun child running this file as its worker
(``python -m torch.distributed.run tests/test_plan.py single --out X``), so the CPU patches
that ``init_distributed`` applies to Megatron stay out of the pytest process.

Regenerate the example plans (examples/plans/) after an intended change with
``MEGATRON_PRIME_UPDATE_GOLDEN=1 python -m pytest tests/test_plan.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "examples" / "plans"
EXAMPLES = ("eurus2_7b_1node", "eurus2_7b_prm1.5b_1node", "qwen2.5_32b_4nodes",
            "qwen2.5_72b_8nodes")

# Tiny models: GQA with q/k/v bias (Qwen2), plain multi-head without bias (Llama), tied
# embeddings. head_dim 16; the vocabularies are not multiples of 128, so padding shows.
TINY = {
    "qwen2_gqa": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=500,
                      hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False),
    "llama_mha": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=300,
                      hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=False),
    "qwen2_tied": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=260,
                       hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=True),
}
# Activation measurement: one micro-batch of this shape through the qwen2_gqa model.
SEQ, MICRO_BATCH = 128, 2
RECOMPUTE = {"none": {}, "selective": {"recompute_granularity": "selective"},
             "full": {"recompute_granularity": "full", "recompute_num_layers": 1}}


def hf_config(fields: dict):
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# =====================================================================================
# Worker (torchrun child): builds real models and reports what they hold, as JSON.
# =====================================================================================

def _numel(chunks) -> int:
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())


def _gpt_numel_by_kind(gpt) -> dict[str, int]:
    """Embedding, output layer and one transformer layer of a built GPTModel."""
    counts = {"total": sum(p.numel() for p in gpt.parameters())}
    if getattr(gpt, "embedding", None) is not None:
        counts["embedding"] = sum(p.numel() for p in gpt.embedding.parameters())
    if getattr(gpt, "output_layer", None) is not None:
        counts["output_layer"] = sum(p.numel() for p in gpt.output_layer.parameters())
    counts["layer"] = sum(p.numel() for p in gpt.decoder.layers[0].parameters())
    return counts


@contextlib.contextmanager
def _on_meta_device():
    """Build without memory: parameters on torch's meta device. ``build_model`` moves the
    model to ``runtime().device``; that becomes meta too (a no-op move)."""
    import dataclasses

    import torch

    from megatron_prime import distributed

    real_runtime = distributed.runtime
    meta_runtime = dataclasses.replace(real_runtime(), device=torch.device("meta"))
    distributed.runtime = lambda: meta_runtime
    try:
        with torch.device("meta"):
            yield
    finally:
        distributed.runtime = real_runtime


def _count_params(parallel) -> dict:
    from megatron_prime.models.builder import build_model

    counts = {}
    for name, fields in TINY.items():
        config = hf_config(fields)
        policy = build_model(config, "policy", parallel)
        reference = build_model(config, "reference", parallel)
        counts[name] = {"policy": _numel(policy.chunks), "reference": _numel(reference.chunks),
                        "kinds": _gpt_numel_by_kind(reference.gpt_chunks()[0])}
    return counts


def _optimizer_bytes(dtype: str, distributed_optimizer: bool) -> dict:
    """One optimizer step of a tiny policy (Adam state exists only after a step)."""
    import torch

    from megatron_prime.config import OptimizerConfig, ParallelConfig, PrecisionConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.models.optimizer import (
        build_optimizer,
        sequence_nll_loss,
        train_step,
    )
    from megatron_prime.models.schedule import TokenBatch

    model = build_model(hf_config(TINY["qwen2_gqa"]), "policy", ParallelConfig(),
                        PrecisionConfig(dtype=dtype),
                        use_distributed_optimizer=distributed_optimizer)
    optimizer = build_optimizer(model, OptimizerConfig(
        lr=1e-3, use_distributed_optimizer=distributed_optimizer))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    train_step(model, optimizer, TokenBatch(ids, mask), 2, sequence_nll_loss)
    moments = master = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in part.optimizer.state.values():
            moments += sum(state[key].nbytes for key in ("exp_avg", "exp_avg_sq"))
        for group_name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(part, group_name, None) or []:
                master += sum(p.nbytes for p in group)
    grad_buffer = sum(buffer.grad_data.nbytes for chunk in model.chunks
                      for buffer in chunk.buffers)
    weights = sum(p.nbytes for chunk in model.chunks for p in chunk.parameters())
    return {"params": _numel(model.chunks), "weights": weights, "moments": moments,
            "master": master, "grad_buffer": grad_buffer}


def _saved_activation_bytes(dtype: str, recompute: str, attention: str) -> dict:
    """Bytes of the tensors saved for backward during one forward (unique storages, minus
    the parameters): by the decoder's layers, and by the whole model plus the trainer's
    vocab-parallel log-probs."""
    import torch

    from megatron_prime.config import ParallelConfig, PrecisionConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.models.logprobs import token_logprobs_and_entropy
    from megatron_prime.models.schedule import TokenBatch

    config = hf_config(TINY["qwen2_gqa"])
    model = build_model(config, "policy", ParallelConfig(**RECOMPUTE[recompute]),
                        PrecisionConfig(dtype=dtype, local_attention=attention))
    gpt = model.gpt_chunks()[0]
    gpt.train()
    parameters = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    saved: dict[str, dict[int, int]] = {"decoder": {}, "model": {}}
    in_decoder = [False]

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameters:
            saved["model"][pointer] = storage.nbytes()
            if in_decoder[0]:
                saved["decoder"][pointer] = storage.nbytes()
        return tensor

    def enter(*_):
        in_decoder[0] = True

    def leave(*_):
        in_decoder[0] = False

    # The layers only: the decoder's final norm belongs to the last stage's extras.
    gpt.decoder.register_forward_pre_hook(enter)
    gpt.decoder.final_layernorm.register_forward_pre_hook(leave)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (MICRO_BATCH, SEQ), generator=generator)
    batch = TokenBatch(ids, torch.ones_like(ids))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        # As the trainer's schedule: no mask where the attention masks causally itself.
        mask = None if model.causal_mask_implicit else batch.attention_mask()
        logits = gpt(ids, batch.position_ids(), mask)
        logprobs, entropy = token_logprobs_and_entropy(logits, ids, batch.response_mask,
                                                       model.shape.vocab_size)
    (logprobs.sum() + entropy.sum()).backward()  # the saved graph is a valid one
    return {name: sum(sizes.values()) for name, sizes in saved.items()}


def _single_process(out: str) -> None:
    from megatron_prime import distributed
    from megatron_prime.config import ParallelConfig
    from megatron_prime.models.builder import build_model
    from megatron_prime.plan import PRESETS, load_hf_config

    distributed.init_distributed(ParallelConfig(), use_gpu=False)
    result: dict = {"tiny": _count_params(ParallelConfig())}
    with _on_meta_device():
        result["presets"] = {
            name: _gpt_numel_by_kind(build_model(load_hf_config(name), "reference",
                                                 ParallelConfig(), initialize_weights=False)
                                     .gpt_chunks()[0])
            for name in PRESETS}
    result["optimizer"] = {f"{dtype}/{'dist' if dist_opt else 'plain'}":
                           _optimizer_bytes(dtype, dist_opt)
                           for dtype in ("float32", "bfloat16") for dist_opt in (False, True)}
    result["activations"] = {f"{dtype}/{recompute}/{attention}":
                             _saved_activation_bytes(dtype, recompute, attention)
                             for dtype in ("float32", "bfloat16") for recompute in RECOMPUTE
                             for attention in ("sdpa", "unfused")}
    distributed.destroy_distributed()
    Path(out).write_text(json.dumps(result))


TWO_PROCESS_LAYOUTS = {"tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2},
                       "dp2": {}}


def _two_processes(out: str, layout: str) -> None:
    """Per-rank counts at TP=2 or PP=2, or the distributed optimizer over DP=2."""
    import torch.distributed as dist

    from megatron_prime import distributed
    from megatron_prime.config import ParallelConfig

    parallel = ParallelConfig(**TWO_PROCESS_LAYOUTS[layout])
    distributed.init_distributed(parallel, use_gpu=False)
    if layout == "dp2":
        local = {dtype: _optimizer_bytes(dtype, True) for dtype in ("float32", "bfloat16")}
    else:
        local = _count_params(parallel)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(gathered))
    distributed.destroy_distributed()


# =====================================================================================
# Tests
# =====================================================================================

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from launch import run_json_worker

    out = tmp_path_factory.mktemp("plan") / "single.json"
    return run_json_worker("tests/test_plan.py", 1, ["single"], out, timeout=300)


def shape_of(fields: dict):
    from megatron_prime.models.architectures import ModelShape

    return ModelShape.from_hf(hf_config(fields))


def preset_shape(name: str):
    from megatron_prime.models.architectures import ModelShape
    from megatron_prime.plan import load_hf_config

    return ModelShape.from_hf(load_hf_config(name))


# ---- parameters ----

@pytest.mark.parametrize("name, published", [
    ("qwen2.5-7b", 7_615_616_512), ("eurus-2-7b", 7_615_616_512),
    ("qwen2.5-32b", 32_763_876_352), ("qwen2.5-72b", 72_706_203_648),
    ("llama-3.1-70b", 70_553_706_496),
])
def test_preset_parameters_equal_the_published_hf_counts(name, published):
    from megatron_prime.plan import model_params

    shape = preset_shape(name)
    assert model_params(shape, vocab_size=shape.vocab_size) == published


def test_presets_count_like_the_real_megatron_model(measured):
    """Each preset built by build_model on the meta device (no memory), at TP=1: Megatron's
    vocabulary is padded to 128 (a no-op for Qwen's 152064 and Llama's 128256 at TP=1)."""
    from megatron_prime.plan import model_params, stage_params

    for name, counts in measured["presets"].items():
        shape = preset_shape(name)
        params = stage_params(shape, tp=1, pp=1, stage=0)
        assert counts["total"] == model_params(shape) == params.total, name
        assert counts["embedding"] == params.embedding, name
        assert counts["output_layer"] == params.output_layer, name
        assert counts["layer"] * shape.num_layers == params.layer_matrices + params.layer_vectors


def test_tiny_models_count_like_the_real_megatron_model(measured):
    from megatron_prime.plan import layer_params, model_params, stage_params

    for name, counts in measured["tiny"].items():
        shape = shape_of(TINY[name])
        params = stage_params(shape, tp=1, pp=1, stage=0)
        assert counts["policy"] == counts["reference"] == params.total == model_params(shape)
        assert counts["kinds"]["embedding"] == params.embedding
        assert counts["kinds"].get("output_layer", 0) == params.output_layer
        assert counts["kinds"]["layer"] == sum(layer_params(shape, 1))
    # Padding is counted: 500 -> 512 rows, and the tied model has one vocabulary matrix.
    assert stage_params(shape_of(TINY["qwen2_gqa"]), 1, 1, 0).embedding == 512 * 64
    assert stage_params(shape_of(TINY["qwen2_tied"]), 1, 1, 0).output_layer == 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(TWO_PROCESS_LAYOUTS))
def test_two_process_layouts_count_like_megatron(layout, tmp_path):
    """TP=2 and PP=2: each rank's parameters; DP=2: the distributed optimizer's shards."""
    from launch import run_json_worker

    from megatron_prime.plan import optimizer_bytes_per_param, stage_params

    ranks = run_json_worker("tests/test_plan.py", 2, ["multi", "--layout", layout],
                            tmp_path / "multi.json", timeout=120)
    if layout != "dp2":
        tp, pp = (2, 1) if layout == "tp2" else (1, 2)
        for name in TINY:
            shape = shape_of(TINY[name])
            for rank in range(2):
                # TP=2: both ranks hold shards of the one stage (vocabulary padded to 256);
                # PP=2: rank r holds stage r (a tied embedding has a copy on the last stage).
                expected = stage_params(shape, tp, pp, 0 if tp == 2 else rank).total
                assert ranks[rank][name]["policy"] == expected, (name, rank)
                assert ranks[rank][name]["reference"] == expected, (name, rank)
        return
    for dtype, param_bytes in (("float32", 4), ("bfloat16", 2)):
        params = ranks[0][dtype]["params"]
        shape = shape_of(TINY["qwen2_gqa"])
        fp32_norms = (2 * shape.num_layers + 1) * shape.hidden_size if param_bytes == 2 else 0
        # The two ranks' shards of the Adam moments partition the parameters.
        assert sum(r[dtype]["moments"] for r in ranks) == params * 8
        assert sum(r[dtype]["master"] for r in ranks) == (params - fp32_norms) * (
            4 if param_bytes == 2 else 0)
        for r in ranks:  # each about half: shards follow buffer ranges, not parameters
            per_rank = params * optimizer_bytes_per_param(param_bytes) / 2
            assert abs(r[dtype]["moments"] + r[dtype]["master"] - per_rank) <= 0.02 * per_rank


# ---- bytes per parameter ----

@pytest.mark.parametrize("dtype, param_bytes", [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("dist_opt", [False, True])
def test_optimizer_state_bytes_equal_megatrons(measured, dtype, param_bytes, dist_opt):
    """On CPU the weights are float32 (their own master copy: 8 optimizer bytes per
    parameter); bfloat16, as on GPU, adds Megatron's fp32 master copy (12)."""
    from megatron_prime.plan import GRAD_BYTES, optimizer_bytes_per_param

    got = measured["optimizer"][f"{dtype}/{'dist' if dist_opt else 'plain'}"]
    params = got["params"]
    shape = shape_of(TINY["qwen2_gqa"])
    # Megatron's local layers (CPU) create RMSNorm weights as torch.nn.RMSNorm in float32 even
    # in a bf16 model: 4 bytes and no master copy. TE's (GPU) follow params_dtype, as planned.
    fp32_norms = (2 * shape.num_layers + 1) * shape.hidden_size if param_bytes == 2 else 0
    planned_weights = params * param_bytes
    planned_optimizer = params * optimizer_bytes_per_param(param_bytes)
    assert got["weights"] == planned_weights + fp32_norms * (4 - param_bytes)
    assert got["moments"] + got["master"] == planned_optimizer - fp32_norms * 4
    assert got["moments"] == params * 8
    if dist_opt:
        # The distributed optimizer pads each parameter's start in the buffer to 64 elements.
        assert params * GRAD_BYTES <= got["grad_buffer"] < (params + 64 * 64) * GRAD_BYTES
    else:
        assert got["grad_buffer"] == params * GRAD_BYTES


def test_trained_model_bytes_are_megatrons_6_plus_12_over_dp():
    """Megatron-LM's theoretical_memory_usage: 18 bytes per parameter, 6 + 12/DP with the
    distributed optimizer (bf16 weights, fp32 grads, fp32 master + Adam moments)."""
    from megatron_prime.plan import (
        Cluster,
        Layout,
        Options,
        Workload,
        plan_layout,
        stage_params,
    )

    shape = preset_shape("qwen2.5-7b")
    for dist_opt, per_param in ((False, 18), (True, 6 + 12 / 2)):
        options = Options(distributed_optimizer=dist_opt)
        layout_plan = plan_layout(shape, Cluster(), Workload(), options, Layout(4, 1, 2))
        params = stage_params(shape, 4, 1, 0).total
        state = sum(layout_plan.components[f"policy {kind}"]["policy update"]
                    for kind in ("weights", "grads (fp32)", "optimizer"))
        assert state == params * per_param
        assert layout_plan.components["reference weights"]["reference forward"] == params * 2


# ---- activations ----

def _estimate(dtype_bytes: int, recompute: str, whole_model: bool, attention: str) -> int:
    from megatron_prime.plan import (
        ActivationShape,
        padded_vocab_size,
        stage_activations,
    )

    shape = shape_of(TINY["qwen2_gqa"])
    act = ActivationShape(SEQ, MICRO_BATCH, tp=1, sequence_parallel=False, attention=attention,
                          dtype_bytes=dtype_bytes)
    stage = stage_activations(shape, act, recompute, RECOMPUTE[recompute].get(
        "recompute_num_layers"), shape.num_layers, first=whole_model, last=whole_model,
        in_flight=1, padded_vocab=padded_vocab_size(shape.vocab_size, 1))
    return stage.stored_per_microbatch


@pytest.mark.parametrize("dtype, dtype_bytes", [("float32", 4), ("bfloat16", 2)])
@pytest.mark.parametrize("recompute", list(RECOMPUTE))
@pytest.mark.parametrize("attention", ["sdpa", "unfused"])
def test_activation_estimate_is_within_20_percent_of_the_saved_tensors(
        measured, dtype, dtype_bytes, recompute, attention):
    """Megatron's local layers (as on CPU) with SDPA (no s x s term, K/V not expanded) and
    with Megatron's unfused attention (the s x s softmax counts)."""
    got = measured["activations"][f"{dtype}/{recompute}/{attention}"]
    for part, whole_model in (("decoder", False), ("model", True)):
        ratio = got[part] / _estimate(dtype_bytes, recompute, whole_model, attention)
        print(f"activations {dtype} recompute={recompute} attention={attention} {part}: "
              f"measured / estimated = {ratio:.3f}")
        assert 0.8 <= ratio <= 1.2, (part, got[part], ratio)


def test_recompute_and_sequence_parallel_shrink_activations_by_hand_counts():
    """Qwen2.5-7B layer at s=4096, b=1, bf16, flash (TE), by hand from the docstring."""
    from megatron_prime.plan import ActivationShape, layer_activation_bytes

    shape = preset_shape("qwen2.5-7b")
    h, q, kv, f, tokens = 3584, 3584, 512, 18944, 4096
    flash = ActivationShape(4096, 1, tp=1, sequence_parallel=False, attention="flash",
                            dtype_bytes=2)
    per_token = 2 * (2 * h * 2 + 4) + (q + kv + q + 2 * kv + q + 3 * f) * 2 + 28 * 4
    assert layer_activation_bytes(shape, flash) == tokens * per_token + 4 * 4096 * 128 * 2
    tp4 = ActivationShape(4096, 1, tp=4, sequence_parallel=True, attention="flash",
                          dtype_bytes=2)
    assert layer_activation_bytes(shape, tp4) == math.ceil(tokens * per_token / 4) \
        + 4 * 4096 * 128 * 2
    # Unfused: the s x s softmax (fp32 + bf16 probabilities) of 28 heads dominates.
    unfused = ActivationShape(4096, 1, 1, False, "unfused", 2)
    assert layer_activation_bytes(shape, unfused) - layer_activation_bytes(
        shape, unfused, checkpoint_core_attention=True) == tokens * (
        (q + q + q + q) * 2 + 28 * 4096 * 6 - (q + kv + q + 2 * kv + q) * 2)


# ---- layouts and the vLLM engine ----

def run_main(argv: list[str]) -> tuple[int, str]:
    from megatron_prime.plan import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue()


def test_a_model_that_cannot_fit_names_the_overflowing_component():
    """Qwen2.5-72B on one node without the distributed optimizer: even split 8 ways, the
    fp32 Adam state alone (12 bytes x ~9.1B parameters per GPU) exceeds an H100."""
    from megatron_prime.plan import Cluster, Options, Workload, plan_run, stage_params

    result = plan_run("qwen2.5-72b", Cluster(nodes=1), Workload(),
                  Options(distributed_optimizer=False, vllm_tensor_parallel_size=8))
    assert result.best is None
    closest = result.closest
    assert closest.largest_component == "policy optimizer"
    params = stage_params(result.shape, closest.layout.tp, closest.layout.pp,
                          0 if closest.stage != "last" else closest.layout.pp - 1).total
    optimizer = closest.components["policy optimizer"][closest.peak_phase]
    assert optimizer == params * 12 > 80e9
    assert closest.peak_bytes - closest.budget_bytes == closest.shortfall_bytes > 0
    assert f"largest: policy optimizer {optimizer / 1e9:.2f} GB" in closest.problem
    # No single change is enough on one node; the distributed optimizer and more nodes are
    # part of what is.
    [(label, fit)] = result.remedies
    assert "--distributed-optimizer" in label and "--nodes 8" in label and fit.fits
    code, text = run_main(["--model", "qwen2.5-72b", "--nodes", "1",
                           "--no-distributed-optimizer", "--vllm-tensor-parallel-size", "8"])
    assert code == 1
    assert "No layout fits 8 GPUs." in text and "largest: policy optimizer" in text


def test_vllm_kv_cache_and_concurrency_by_hand():
    """Eurus-2-7B, gpu_memory_utilization 0.4 of 80 GB, vLLM TP 1: KV per token is
    2 x 28 layers x 4 KV heads x 128 x 2 bytes."""
    from megatron_prime.plan import GIB, Cluster, Layout, Options, Workload, plan_layout

    shape = preset_shape("eurus-2-7b")
    work = Workload(prompt_tokens=1024, response_tokens=3072, prompts_per_step=256,
                    oversample_factor=4, samples_per_prompt=4)
    layout_plan = plan_layout(shape, Cluster(), work, Options(vllm_memory_fraction=0.4),
                              Layout(4, 1, 2))
    vllm = layout_plan.vllm
    assert vllm.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert vllm.weight_bytes == 7_615_616_512 * 2
    kv_cache = 32_000_000_000 - 7_615_616_512 * 2 - 2 * GIB
    assert vllm.kv_cache_bytes == kv_cache
    assert vllm.concurrent_sequences == kv_cache // (57344 * 4096) == 62
    # vLLM TP 1 at TP=4 DP=2: one engine per GPU, 8 in all (every GPU generates).
    assert vllm.engines == 8
    assert vllm.rollouts_per_engine == 256 * 4 * 4 // 8 and vllm.waves == math.ceil(512 / 62)
    # vLLM TP 2 halves the weights and the KV bytes per token on each GPU.
    split = plan_layout(shape, Cluster(), work, Options(vllm_memory_fraction=0.4,
                        vllm_tensor_parallel_size=2), Layout(4, 1, 2)).vllm
    assert split.kv_bytes_per_token == 57344 // 2
    assert split.concurrent_sequences == (32_000_000_000 - split.weight_bytes - 2 * GIB) \
        // (57344 // 2 * 4096)


def test_vllm_replicates_kv_heads_beyond_its_tp():
    """Tiny GQA model (2 KV heads) at vLLM TP 4: each rank keeps one whole KV head (16)."""
    from megatron_prime.plan import vllm_weight_params

    shape = shape_of(TINY["qwen2_gqa"])
    q, kv, ffn = 64 // 4, 16, 176 // 4
    layer = 64 * (q + 2 * kv) + (q + 2 * kv) + q * 64 + 3 * 64 * ffn + 2 * 64
    assert vllm_weight_params(shape, 4) == 2 * layer + 2 * 128 * 64 + 64  # vocab 500 -> 128/rank


def test_frozen_prm_holds_its_weights_only():
    """algo.prm_mode=frozen: the PRM's bf16 weights (2 B/param, like the reference), no
    gradients, Adam state or update phase; a trained PRM's state is bigger by all of those."""
    from megatron_prime.plan import Cluster, Layout, Options, Workload, plan_layout, stage_params

    shape = preset_shape("eurus-2-7b")
    layout = Layout(4, 1, 2)
    trained = plan_layout(shape, Cluster(), Workload(), Options(), layout)
    frozen = plan_layout(shape, Cluster(), Workload(), Options(prm_trains=False), layout)
    params = stage_params(shape, 4, 1, 0)
    assert frozen.components["PRM weights (frozen)"]["reference forward"] == params.total * 2
    assert not any(name.startswith("PRM") and name != "PRM weights (frozen)" for name in frozen.components)
    assert "PRM update" not in frozen.phase_totals and "PRM update" in trained.phase_totals
    assert frozen.phase_totals["policy update"] < trained.phase_totals["policy update"]


def test_sleep_mode_peak_is_the_max_of_phases_not_the_sum():
    from megatron_prime.plan import GIB, Cluster, Layout, Options, Workload, plan_layout

    shape = preset_shape("eurus-2-7b")
    layout = Layout(4, 2, 1)
    asleep = plan_layout(shape, Cluster(), Workload(), Options(), layout)
    awake = plan_layout(shape, Cluster(), Workload(), Options(vllm_sleep_mode=False), layout)
    engine = 40_000_000_000
    assert asleep.phase_totals["rollout"] == awake.phase_totals["rollout"]
    update_without_engine = asleep.phase_totals["policy update"] - 1 * GIB
    assert awake.phase_totals["policy update"] == update_without_engine + engine
    assert asleep.peak_bytes == max(asleep.phase_totals.values())


def test_offload_fp8_and_pipeline_by_hand():
    from megatron_prime.plan import (
        Cluster,
        Layout,
        Options,
        Workload,
        plan_layout,
        stage_params,
    )

    shape = preset_shape("qwen2.5-32b")
    layout = Layout(8, 4, 1)
    options = Options(offload_prm=True, offload_reference=True, policy_fp8=True,
                      reference_fp8=True, distributed_optimizer=True, offload_during_rollout=False)
    work = Workload(micro_batch_size=1, prompts_per_step=256, samples_per_prompt=4)
    p = plan_layout(shape, Cluster(nodes=4), work, options, layout)
    # Offloaded: the PRM's state is on the GPU in its phase only, the reference in its own.
    assert set(p.components["PRM optimizer"]) == {"PRM update"}
    assert set(p.components["reference weights"]) == {"reference forward"}
    params = stage_params(shape, 8, 4, 3)  # the last stage is the worst here
    assert p.stage == "last"
    assert p.components["policy FP8 weight copy"]["rollout"] == params.layer_matrices
    assert p.components["reference FP8 weight copy"]["reference forward"] == params.layer_matrices
    assert "PRM FP8 weight copy" not in p.components
    # 1024 rollouts of one micro-batch each on the one DP rank; bubble (PP-1)/(m+PP-1).
    assert p.num_microbatches == 1024
    assert p.pipeline_bubble == pytest.approx(3 / 1027)


def test_layouts_keep_tp_in_a_node_and_divide_heads_and_layers():
    from megatron_prime.plan import Cluster, candidate_layouts

    layouts = candidate_layouts(preset_shape("eurus-2-7b"), Cluster(nodes=2))
    # 28 heads / 4 KV heads: TP in {1, 2, 4}; PP divides 28 and 16 / TP.
    assert sorted((lay.tp, lay.pp) for lay in layouts) == [
        (1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4)]
    assert all(lay.tp * lay.pp * lay.dp == 16 for lay in layouts)


def test_json_output_and_errors():
    code, text = run_main(["--model", "eurus-2-7b", "--json", "--micro-batch-size", "1",
                           "--vllm-memory-fraction", "0.4", "--distributed-optimizer"])
    data = json.loads(text)
    assert code == 0 and data["best"] is not None
    assert data["parameters"]["hf"] == 7_615_616_512
    assert data["best"]["peak_bytes"] <= data["cluster"]["budget_bytes"]
    with pytest.raises(SystemExit, match=r"--vllm-tensor-parallel-size=3 is invalid"):
        run_main(["--model", "eurus-2-7b", "--vllm-tensor-parallel-size", "3"])
    with pytest.raises(SystemExit, match=r"neither a preset nor a config.json"):
        run_main(["--model", "no-such-model"])


def test_config_json_path_reads_like_the_preset(tmp_path):
    from megatron_prime.plan import PRESETS

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen2.5-7b"]))
    _, from_path = run_main(["--model", str(tmp_path), "--json"])
    _, from_preset = run_main(["--model", "qwen2.5-7b", "--json"])
    assert json.loads(from_path)["layouts"] == json.loads(from_preset)["layouts"]


def test_console_script_and_tool_are_declared():
    setup = (REPO / "setup.py").read_text()
    assert '"megatron-prime-plan=megatron_prime.plan:main"' in setup
    assert "from megatron_prime.plan import main" in (REPO / "tools" / "plan.py").read_text()


# ---- example plans (golden files) ----

@pytest.mark.parametrize("name", EXAMPLES)
def test_example_plans_match_their_command(name):
    path = PLANS / f"{name}.txt"
    header = path.read_text().splitlines()[0]
    prefix = "# megatron-prime-plan "
    assert header.startswith(prefix), header
    code, text = run_main(shlex.split(header[len(prefix):]))
    if os.environ.get("MEGATRON_PRIME_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert code == 0, "every example plan has a layout that fits"
    assert text == path.read_text()


# =====================================================================================

def _worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("single", "multi"))
    parser.add_argument("--layout", choices=list(TWO_PROCESS_LAYOUTS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode == "single":
        _single_process(args.out)
    else:
        _two_processes(args.out, args.layout)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker_main()


@pytest.mark.parametrize("config_file, plan_file", [
    ("examples/eurus2_7b_prime.yaml", "examples/plans/eurus2_7b_1node.txt"),
    ("examples/eurus2_7b_rloo.yaml", "examples/plans/eurus2_7b_1node.txt"),
    ("examples/eurus2_7b_prime_prm1.5b.yaml", "examples/plans/eurus2_7b_prm1.5b_1node.txt"),
    ("examples/qwen2.5_32b_prime.yaml", "examples/plans/qwen2.5_32b_4nodes.txt"),
    ("examples/qwen2.5_72b_prime.yaml", "examples/plans/qwen2.5_72b_8nodes.txt"),
])
def test_example_run_configs_use_the_planned_layout(config_file, plan_file):
    """The example configs run what their committed plan checked: its best layout and the
    options on its command line."""
    import re

    from megatron_prime.config import load_config
    from megatron_prime.train import PrimeConfig

    repo = Path(__file__).resolve().parents[1]
    prime = load_config(PrimeConfig, str(repo / config_file), [])
    text = (repo / plan_file).read_text()
    tp, pp = (int(x) for x in re.search(r"Best layout: TP=(\d+) PP=(\d+)", text).groups())
    command = text.splitlines()[0].split()

    def flag(name: str) -> str | None:
        return command[command.index(name) + 1] if name in command else None

    assert (prime.parallel.tensor_parallel_size, prime.parallel.pipeline_parallel_size) == (tp, pp)
    assert prime.algo.micro_batch_size == int(flag("--micro-batch-size"))
    assert prime.rollout.engine.gpu_memory_utilization == float(flag("--vllm-memory-fraction"))
    assert prime.rollout.engine.tensor_parallel_size == int(flag("--vllm-tensor-parallel-size"))
    assert prime.rollout.sampling.max_new_tokens == int(flag("--response-tokens"))
    assert prime.data.max_prompt_tokens == int(flag("--prompt-tokens"))
    assert prime.rollout.batch.prompts_per_step == int(flag("--prompts-per-step"))
    assert prime.algo.num_samples_per_prompt == int(flag("--samples-per-prompt"))
    assert prime.policy_optimizer.use_distributed_optimizer == ("--distributed-optimizer" in command)
    assert prime.parallel.recompute_granularity == (flag("--recompute") or "none")
    assert prime.parallel.sequence_parallel == ("--sequence-parallel" in command)
    assert (prime.model.prm_path is not None) == ("--prm-model" in command)


# ---- what the trainer leaves to vLLM ----

def _tiny_plan(**changes):
    """The tiny Qwen2 (GQA, q/k/v bias, vocab 500 -> 512) on one 0.1 GB 'GPU' with a
    0.01 GiB reserve: small enough that every byte is counted by hand below."""
    from megatron_prime.plan import Cluster, Layout, Options, Workload, plan_layout

    layout = changes.pop("layout", Layout(1, 1, 1))
    work = Workload(prompt_tokens=64, response_tokens=64, micro_batch_size=1,
                    samples_per_prompt=2, prompts_per_step=2, oversample_factor=1)
    options = Options(**{"distributed_optimizer": False, "vllm_overhead_gib": 0.001,
                         "vllm_asleep_gib": 0.001, **changes})
    cluster = Cluster(nodes=1, gpus_per_node=layout.tp * layout.pp * layout.dp,
                      gpu_memory_gb=0.1, reserved_gib=0.01)
    return plan_layout(shape_of(TINY["qwen2_gqa"]), cluster, work, options, layout)


def test_trainer_resident_and_max_vllm_fraction_by_hand():
    """Per layer: q/k/v 128 x 64 + proj 64 x 64 + fc1 352 x 64 + fc2 64 x 176 = 46,080 GEMM
    weights, 128 q/k/v bias + 2 x 64 norm = 256 vectors; 2 layers, embedding and output layer
    512 x 64 each, final norm 64: P = 158,272 parameters.

    What stays while vLLM runs (after empty_cache) in a run that keeps its state
    (trainer.offload_during_rollout=false): policy and PRM 2 (bf16) + 4 (fp32 grad buffer) +
    12 (fp32 master + Adam moments) bytes each, the reference 2: 38 P. Budget
    100,000,000 - round(0.01 x 2^30) = 89,262,582; vLLM may take (budget - 38 P) / 1e8 =
    0.832... -> 0.83."""
    P = 2 * (128 * 64 + 64 * 64 + 352 * 64 + 64 * 176 + 128 + 2 * 64) + 2 * 512 * 64 + 64
    assert P == 158_272
    budget = 100_000_000 - 10_737_418
    plan = _tiny_plan(vllm_memory_fraction=0.8, offload_during_rollout=False)
    assert plan.budget_bytes == budget
    assert plan.trainer_resident_bytes == 38 * P == 6_014_336
    assert sum(by_phase.get("rollout", 0) for name, by_phase in plan.components.items()
               if not name.startswith("vLLM")) == 38 * P  # no activations in the rollout
    assert plan.max_vllm_memory_fraction == 0.83 == math.floor((budget - 38 * P) / 1e6) / 100
    assert plan.fits
    # Distributed optimizer at DP=2: master + moments split in two (6 P each); the reference
    # offloaded: absent during the rollout. 2 x (2 + 4 + 6) P = 24 P.
    from megatron_prime.plan import Layout

    sharded = _tiny_plan(distributed_optimizer=True, offload_reference=True,
                         layout=Layout(1, 1, 2), offload_during_rollout=False)
    assert sharded.trainer_resident_bytes == 24 * P
    assert sharded.max_vllm_memory_fraction == math.floor((budget - 24 * P) / 1e6) / 100 == 0.85
    assert plan.rollout_host_bytes == sharded.rollout_host_bytes == 0


def test_the_rollout_offload_leaves_vllm_all_but_the_weights_by_hand():
    """trainer.offload_during_rollout (the default): during the rollout only the policy's
    and the PRM's bf16 weights stay, 2 x 2 P = 4 P, and vLLM may take (budget - 4 P) / 1e8 =
    0.886... -> 0.88. The grads come back in their phases; the host holds the optimizer
    states (2 x 12 P) and the reference's weights (2 P) = 26 P, pinned. With the reference
    offloaded anyway it is not counted again (24 P); a frozen PRM's weights are (2 P)."""
    P = 158_272
    budget = 100_000_000 - 10_737_418
    plan = _tiny_plan(vllm_memory_fraction=0.8)
    assert plan.trainer_resident_bytes == 4 * P
    assert plan.max_vllm_memory_fraction == math.floor((budget - 4 * P) / 1e6) / 100 == 0.88
    assert plan.rollout_host_bytes == 26 * P
    for name in ("policy grads (fp32)", "policy optimizer", "PRM grads (fp32)", "PRM optimizer",
                 "reference weights"):
        assert "rollout" not in plan.components[name], name
        assert "policy update" in plan.components[name], name
    assert plan.components["policy weights"]["rollout"] == 2 * P
    assert _tiny_plan(offload_reference=True).rollout_host_bytes == 24 * P
    frozen = _tiny_plan(prm_trains=False)
    assert frozen.trainer_resident_bytes == 2 * P
    assert frozen.rollout_host_bytes == 12 * P + 2 * P + 2 * P


def test_a_smaller_prm_and_its_reference_are_counted_at_their_size(tmp_path):
    """--prm-model (model.prm_path of another size): a PRM of hidden 32, one layer, 4 heads /
    2 KV heads of 8, ffn 64, vocab 500 -> 512. Its layer: q/k/v 64 x 32 + proj 32 x 32 + fc1
    128 x 32 + fc2 32 x 64 = 9,216 GEMM weights, 64 bias + 2 x 32 norm = 128 vectors;
    embedding and output layer 512 x 32 each, final norm 32: Q = 42,144 parameters.

    In the rollout the policy's and the PRM's bf16 weights stay (2 P + 2 Q); the host holds
    both optimizer states (12 P + 12 Q) and the reference's weights (2 Q). Outcome-only RLOO
    builds no reference (and no PRM): only the policy is counted."""
    P = 158_272
    Q = (64 * 32 + 32 * 32 + 128 * 32 + 32 * 64 + 64 + 2 * 32) + 2 * 512 * 32 + 32
    assert Q == 42_144
    small = dict(TINY["qwen2_gqa"], hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(small))
    plan = _tiny_plan(prm_model=str(config))
    assert plan.trainer_resident_bytes == 2 * P + 2 * Q
    assert plan.rollout_host_bytes == 12 * P + 12 * Q + 2 * Q
    assert plan.components["PRM weights"]["PRM update"] == 2 * Q
    assert plan.components["PRM optimizer"]["PRM update"] == 12 * Q
    assert plan.components["reference weights"]["reference forward"] == 2 * Q
    assert plan.components["policy weights"]["PRM update"] == 2 * P
    # Its activations are a smaller model's: less than the policy's at the same micro-batch.
    same = _tiny_plan()
    assert plan.components["PRM activations"]["PRM update"] \
        < same.components["PRM activations"]["PRM update"]
    rloo = _tiny_plan(prm_model=str(config), with_prm=False, prm_trains=False)
    assert not any(name.startswith(("PRM", "reference")) for name in rloo.components)
    assert rloo.rollout_host_bytes == 12 * P


def test_a_prm_of_its_own_size_limits_the_layouts_and_the_step_time():
    """Qwen2.5-Math-1.5B's 12 heads / 2 KV heads split at TP 1 or 2 only: the 7B policy's
    plan keeps those layouts. Its PRM update and reference forward cost less."""
    from megatron_prime.plan import Cluster, Options, Workload, plan_run

    work = Workload(prompt_tokens=1024, response_tokens=3072, micro_batch_size=1)
    options = Options(distributed_optimizer=True, vllm_memory_fraction=0.6,
                      vllm_tensor_parallel_size=4)
    same = plan_run("eurus-2-7b", Cluster(), work, options)
    small = plan_run("eurus-2-7b", Cluster(), work,
                     Options(**{**options.__dict__, "prm_model": "qwen2.5-math-1.5b"}))
    assert {p.layout.tp for p in same.layouts} == {1, 2, 4}
    assert {p.layout.tp for p in small.layouts} == {1, 2}
    assert small.step_time.seconds["PRM update"] < same.step_time.seconds["PRM update"] / 3
    assert small.step_time.seconds["policy update"] == pytest.approx(
        same.step_time.seconds["policy update"] * (1 - same.best.pipeline_bubble)
        / (1 - small.best.pipeline_bubble))
    with pytest.raises(ValueError, match="--prm-model='nope'"):
        plan_run("eurus-2-7b", Cluster(), work, Options(prm_model="nope"))
    _, text = run_main(["--model", "eurus-2-7b", "--prm-model", "qwen2.5-math-1.5b"])
    assert "PRM and reference: qwen2.5-math-1.5b (Qwen2ForCausalLM): 28 layers, hidden 1536" in text


def test_a_vllm_share_above_what_the_trainer_leaves_is_named():
    plan = _tiny_plan(vllm_memory_fraction=0.9, offload_during_rollout=False)
    assert not plan.fits and plan.peak_phase == "rollout"
    assert "vLLM gpu_memory_utilization 0.9 > 0.83, the most that fits beside the trainer's " \
           "0.01 GB" in plan.problem
    # Without sleep mode the engine stays through the updates: what the trainer keeps beside
    # it is its fullest phase, activations included.
    awake = _tiny_plan(vllm_memory_fraction=0.5, vllm_sleep_mode=False)
    engine = sum(by_phase["policy update"] for name, by_phase in awake.components.items()
                 if name.startswith("vLLM"))
    fullest = max(awake.phase_totals.values())
    assert awake.trainer_resident_bytes == fullest - engine > 38 * 158_272
    assert awake.max_vllm_memory_fraction == math.floor(
        (awake.budget_bytes - awake.trainer_resident_bytes) / 1e6) / 100


def test_report_gives_the_vllm_share_that_fits():
    code, text = run_main(["--model", "eurus-2-7b", "--micro-batch-size", "1",
                           "--distributed-optimizer", "--vllm-memory-fraction", "0.3",
                           "--vllm-tensor-parallel-size", "4", "--no-offload-during-rollout"])
    assert code == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("Trainer resident while vLLM"))
    # TP=4 PP=1 DP=2: per GPU 1.90B parameters; policy and PRM 2 + 4 + 6 bytes, reference 2.
    from megatron_prime.plan import stage_params

    params = stage_params(preset_shape("eurus-2-7b"), 4, 1, 0).total
    resident = 2 * (2 + 4 + 6) * params + 2 * params
    assert f"reference) {resident / 1e9:.2f} GB + reserve 3.22 GB" in line
    most = math.floor((80e9 - 3 * 2**30 - resident) / 0.8e9) / 100
    assert f"at most {most:.2f} (configured 0.3: fits)" in line and most == 0.34


def test_report_with_the_rollout_offload_gives_vllm_the_freed_memory():
    code, text = run_main(["--model", "eurus-2-7b", "--micro-batch-size", "1",
                           "--distributed-optimizer", "--vllm-memory-fraction", "0.6",
                           "--vllm-tensor-parallel-size", "4"])
    assert code == 0
    line = next(ln for ln in text.splitlines() if ln.startswith("Trainer resident while vLLM"))
    from megatron_prime.plan import stage_params

    # TP=4 PP=1 DP=2: only the bf16 weights of policy and PRM stay; the host holds both
    # optimizers' 6 bytes per parameter (distributed over DP=2) and the reference's 2.
    params = stage_params(preset_shape("eurus-2-7b"), 4, 1, 0).total
    resident, host = 2 * 2 * params, 2 * 6 * params + 2 * params
    assert f"{host / 1e9:.2f} GB pinned per GPU) {resident / 1e9:.2f} GB + reserve 3.22 GB" in line
    most = math.floor((80e9 - 3 * 2**30 - resident) / 0.8e9) / 100
    assert f"at most {most:.2f} (configured 0.6: fits)" in line and most == 0.86


def test_engines_are_placed_as_the_trainer_places_them():
    """Megatron's rank order (TP fastest, then DP, then PP): stage s of replica d starts at
    rank s*TP*DP + d*TP. The default is one engine per vLLM-TP GPUs of a replica: one 8-GPU
    node at TP=2 PP=2 DP=2 with vLLM TP 2 -> 2 engines per replica (ranks 0-1 and 4-5), 4 in
    all; vLLM TP 4 -> 1 per replica, on ranks 0, 1, 4, 5 (one node: fine). Four nodes at TP=2
    PP=4 DP=4: a replica's stages sit on four nodes, so a vLLM TP 4 engine would span two."""
    from megatron_prime.plan import (Cluster, Layout, Options, Workload, engine_placement_problem,
                                     engines_per_replica, plan_run)

    assert engines_per_replica(Layout(2, 2, 2), Options(vllm_tensor_parallel_size=2)) == 2
    assert engines_per_replica(Layout(2, 2, 2), Options(vllm_tensor_parallel_size=4)) == 1
    assert engines_per_replica(Layout(2, 1, 4), Options(vllm_tensor_parallel_size=4)) == 0
    assert engine_placement_problem(Layout(2, 2, 2), 8, 2, 2) is None
    assert engine_placement_problem(Layout(2, 2, 2), 8, 1, 4) is None
    assert engine_placement_problem(Layout(8, 2, 2), 8, 2, 8) is None
    assert engine_placement_problem(Layout(2, 4, 4), 8, 2, 4) == (
        "an engine's 4 GPUs would span nodes (ranks 0..9 of replica 0); vLLM TP must stay "
        "within a node")
    assert engine_placement_problem(Layout(2, 1, 4), 8, 0, 4) == (
        "vLLM TP 4 needs 4 GPUs of one replica per engine; this layout's replica has 2")
    assert engine_placement_problem(Layout(4, 1, 2), 8, 3, 1) == (
        "3 engines per replica do not split a replica's 4 GPUs evenly")
    # The plan: a replica smaller than one engine does not fit; with every GPU generating the
    # engines are DP x TP x PP / vLLM TP, and each gets its share of the rollouts.
    work = Workload(prompt_tokens=1024, response_tokens=3072)
    plan = plan_run("eurus-2-7b", Cluster(), work,
                    Options(distributed_optimizer=True, vllm_tensor_parallel_size=4))
    by_layout = {(p.layout.tp, p.layout.pp): p for p in plan.layouts}
    assert not by_layout[(2, 1)].fits
    assert "vLLM TP 4 needs 4 GPUs of one replica per engine; this layout's replica has 2" \
        in by_layout[(2, 1)].problem
    assert by_layout[(4, 1)].vllm.engines == 2 and by_layout[(2, 2)].vllm.engines == 2
    small_tp = plan_run("eurus-2-7b", Cluster(), work,
                        Options(distributed_optimizer=True, vllm_tensor_parallel_size=2))
    p = {(q.layout.tp, q.layout.pp): q for q in small_tp.layouts}[(4, 1)]
    rollouts = work.prompts_per_step * work.oversample_factor * work.samples_per_prompt
    assert p.vllm.engines == 4 and p.vllm.rollouts_per_engine == rollouts // 4
