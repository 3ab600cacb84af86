"""The Megatron -> vLLM weight bridge against a real vLLM engine (CPU build).

After a sync, vLLM's sampler log-probs for its own samples equal the Megatron policy's
log-probs of the same tokens (within 1e-3) at every trainer layout; after an optimizer
step and another sync they equal the *updated* policy's; seeded sampling repeats.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fixtures import save_tokenizer
from launch import REPO, run_json_worker

pytestmark = pytest.mark.slow

LAYOUTS = {"tp1pp1": (1, 1), "tp2pp2": (2, 2)}


def save_model(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int = 300,
               heads: int = 4, kv_heads: int = 2) -> Path:
    """A Qwen2 whose head size (hidden / heads = 64) vLLM's CPU attention supports."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=0,
                         architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=min(vocab, 290))
    return folder


def save_tied_llama(folder: Path) -> Path:
    """A Llama with tied embeddings (no lm_head tensor; vLLM's head reads the embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=0, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder, vocab_size=290)
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("vllm") / "model", hidden=256, layers=2,
                      intermediate=512)


def max_gap(phase: dict) -> float:
    return max(abs(a - b) for ours, theirs in zip(phase["vllm_logprobs"], phase["megatron_logprobs"])
               for a, b in zip(ours, theirs))


# TP=2 PP=2 gathers TP shards and broadcasts across stages in one job, so the separate TP=2
# and PP=2 jobs (~55 s each) add no path; TP=1 PP=1 keeps the no-gather path for reload,
# and the tied Llama (TP=1 PP=1) for shared.
CASES = [("tp1pp1", "reload"), ("tp2pp2", "reload"), ("tp2pp2", "shared"), ("tied_llama", "shared")]


@pytest.mark.parametrize("layout,weight_sync", CASES)
def test_vllm_logprobs_match_megatron_after_sync_and_after_a_step(layout, weight_sync, tiny_model,
                                                                  tmp_path):
    if layout == "tied_llama":
        tiny_model, layout = save_tied_llama(tmp_path / "llama"), "tp1pp1"
    tp, pp = LAYOUTS[layout]
    # 64 KiB buckets: the 5 MB model crosses many bucket boundaries.
    result = run_json_worker("tests/workers/bridge_worker.py", tp * pp, [
        "--hf-dir", str(tiny_model), "--tp", str(tp), "--pp", str(pp),
        "--bucket-bytes", str(64 * 1024), "--weight-sync", weight_sync], tmp_path / "result.json")
    before, after = result["phases"]
    assert max_gap(before) < 1e-3
    # The step moved the policy: the greedy outputs changed, and vLLM follows Megatron's
    # updated log-probs, not the old ones.
    assert before["responses"] != after["responses"]
    assert max_gap(after) < 1e-3
    # Reload hands over buckets; shared writes every tensor in place, with no buckets.
    assert (result["sync"]["buckets"] > 10) if weight_sync == "reload" else (result["sync"]["buckets"] == 0)
    assert result["unknown_weight_error"] == "no HF mapping for Megatron tensor 'adapter_scale'"

    seeded = result["seeded"]
    assert seeded["first"] == seeded["second"]  # same seed, same samples
    assert seeded["first"] != seeded["other_seed"]
    assert seeded["keys"] == [[p, s] for p in range(2) for s in range(3)]  # n=3 per prompt
    twice = seeded["same_prompt_twice"]
    assert twice[:3] != twice[3:]  # each prompt draws its own random stream
    assert twice[:3] == seeded["first"][:3]  # ... and prompt 0's stream depends on its index only


def test_sync_memory_stays_below_one_model_copy(tmp_path):
    """~200M parameters: the RSS growth during a sync is buckets, not a second model."""
    model = save_model(tmp_path / "model", hidden=1024, layers=12, intermediate=2816,
                       vocab=32000, heads=16, kv_heads=4)
    bucket = 32 * 1024**2
    result = run_json_worker("tests/workers/bridge_worker.py", 1, [
        "--hf-dir", str(model), "--memory-only", "--bucket-bytes", str(bucket)],
        tmp_path / "memory.json")
    model_bytes = result["sync_bytes"]
    assert model_bytes > 700e6  # ~200M float32 parameters went through the bridge
    growth = result["rss_peak"] - result["rss_before"]
    # Trainer-side growth: the bucket being filled and the engine's shared-memory block, each
    # at most max(bucket, largest tensor) (the 131 MB embedding here); a margin of 10% of
    # the model still rules out a second copy.
    unit = max(bucket, result["largest_tensor_bytes"])
    assert growth < 2 * unit + 0.1 * model_bytes, (growth, unit, model_bytes)


def test_shared_weight_sync_moves_no_second_copy(tmp_path):
    """weight_sync=shared, ~200M parameters: the physical memory (PSS) of trainer + engine.

    The first sync moves the engine's parameters into a shared file one at a time (at most
    one tensor in flight); later syncs write in place and add nothing. The trainer's RSS
    does grow by one model, because it maps the engine's pages: those pages are counted in
    both processes' RSS but exist once, which PSS (and a SLURM job's cgroup) counts right."""
    model = save_model(tmp_path / "model", hidden=1024, layers=12, intermediate=2816,
                       vocab=32000, heads=16, kv_heads=4)
    result = run_json_worker("tests/workers/bridge_worker.py", 1, [
        "--hf-dir", str(model), "--memory-only", "--weight-sync", "shared"],
        tmp_path / "memory.json")
    model_bytes, largest = result["sync_bytes"], result["largest_tensor_bytes"]
    assert model_bytes > 700e6 and result["num_buckets"] == 0
    assert result["pss_first_peak"] - result["pss_before"] < largest + 0.1 * model_bytes, result
    assert result["pss_between"] - result["pss_before"] < 0.1 * model_bytes, result
    assert result["pss_next_peak"] - result["pss_between"] < 0.05 * model_bytes, result
    # The mapped engine pages: one model in RSS, not two.
    assert 0.9 * model_bytes < result["rss_peak"] - result["rss_before"] < 1.2 * model_bytes, result


def test_bad_engine_configs_fail_before_sampling(tiny_model, tmp_path):
    code = r'''
import json, sys
from pathlib import Path
from megatron_prime.rollout.engine import RolloutConfig, RolloutEngine, SamplingConfig
errors = {}
folder = Path(sys.argv[1])
odd = Path(sys.argv[2])
odd.mkdir()
config = json.loads((folder / "config.json").read_text())
config["num_attention_heads"] = 16  # head size 256 / 16 = 16
(odd / "config.json").write_text(json.dumps(config))
try:
    RolloutEngine(odd, RolloutConfig(), on_gpu=False)
except ValueError as error:
    errors["head_size"] = str(error)
engine = RolloutEngine(folder, RolloutConfig(max_model_len=64, enforce_eager=True), on_gpu=False)
try:
    engine.generate([[5] * 40], SamplingConfig(n=1, max_new_tokens=30))
except ValueError as error:
    errors["length"] = str(error)
try:
    engine.generate([[5]], SamplingConfig(n=0))
except ValueError as error:
    errors["n"] = str(error)
# The engine owns its sleep/weight state: it never samples with dummy or dropped weights.
from megatron_prime.rollout.engine import EngineStateError
few = SamplingConfig(n=1, max_new_tokens=2)
def state_error(name):
    try:
        engine.generate([[5]], few)
    except EngineStateError as error:
        errors[name] = str(error)
state_error("dummy")
try:
    engine.load_weights([])
except EngineStateError as error:
    errors["outside_sync"] = str(error)
# As after a sync (the dummy weights are the weights here): vLLM's start/finish pair.
engine.start_weight_update()
engine.weights_written(0)
errors["version_0"] = engine.weight_version
# vLLM's own contract, straight on the LLM: an update outside start/finish is refused by
# vLLM's worker, and the engine still samples afterwards.
try:
    engine.llm.update_weights({"update_info": {"block_name": "none", "entries": []}})
except Exception as error:
    errors["vllm_order"] = str(error)
errors["ready_samples"] = len(engine.generate([[5]], few))
# A seeded round past vLLM's CPU token budget per step (30 x 4 x 40 = 4800 > 4096 prompt
# tokens): with chunked prefill vLLM would rewind a CPU generator and die (engine.py).
large = engine.generate([[5 + i % 7] * 40 for i in range(30)], SamplingConfig(n=4, max_new_tokens=4, seed=3))
errors["large_round"] = [len(large), sorted({len(r.response_token_ids) for r in large})]
# Streamed: each prompt's rollouts reach on_finished as vLLM finishes them (the round above
# needs two prefill steps, so the first prompts finish while others still run), and the
# samples are those of the plain call.
calls = []
def on_finished(rollouts):
    calls.append([rollouts[0].prompt_index, len(rollouts),
                  engine.llm.llm_engine.get_num_unfinished_requests()])
round_prompts = [[5 + i % 7] * 40 for i in range(30)]
round_sampling = SamplingConfig(n=4, max_new_tokens=4, seed=3)
engine.llm.reset_prefix_cache()
plain = engine.generate(round_prompts, round_sampling)
engine.llm.reset_prefix_cache()
streamed = engine.generate(round_prompts, round_sampling, on_finished=on_finished)
errors["stream_tokens_equal"] = ([r.response_token_ids for r in plain]
                                 == [r.response_token_ids for r in streamed])
errors["stream_logprob_gap"] = max(abs(a - b) for x, y in zip(plain, streamed)
                                   for a, b in zip(x.logprobs, y.logprobs))
errors["stream_calls"] = calls
def broken(rollouts):
    raise KeyError("scoring broke")
try:
    engine.generate(round_prompts, round_sampling, on_finished=broken)
except KeyError as error:
    errors["stream_error"] = str(error)
errors["after_error"] = [len(engine.generate([[5]], few)),
                         engine.llm.llm_engine.get_num_unfinished_requests()]
engine.sleep()
state_error("asleep")
try:
    engine.load_weights([])
except EngineStateError as error:
    errors["load_asleep"] = str(error)
engine.wake_weights()
try:
    engine.wake_kv_cache()
except EngineStateError as error:
    errors["kv_first"] = str(error)
engine.start_weight_update()
engine.weights_written(1)
errors["version_1"] = engine.weight_version
state_error("weights_only")
engine.wake_kv_cache()
errors["woken_samples"] = len(engine.generate([[5]], few))
# scancel: SIGTERM (and SLURM's USR1 warning) to every process of the job step. The engine's
# processes must outlive it (job_signals.py); only the trainer's StopRequest reacts.
import os, signal, time
from megatron_prime.train import StopRequest
from megatron_prime.rollout.engine import engine_core_processes
stop = StopRequest()
from tests.launch import descendants
def running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
cores = [process.pid for process in engine_core_processes(engine.llm.llm_engine.engine_core)]
engine_processes = cores + [pid for core in cores for pid in descendants(core)]
children = descendants(os.getpid())  # the engine's, and multiprocessing's resource tracker
for pid in children:
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(2.0)
errors["signalled"] = {"cores": len(cores), "children": len(children),
                       "alive": sum(running(pid) for pid in children), "stop": stop.signal_name}
errors["samples_after_sigterm"] = len(engine.generate([[5]], few))
started = time.monotonic()
engine.shutdown()  # SIGINT to the engine core: it stops, and its workers with it
errors["shutdown_s"] = time.monotonic() - started
time.sleep(1.0)  # a killed process takes a moment to go
errors["engine_processes"] = len(engine_processes)
errors["left_after_shutdown"] = [pid for pid in engine_processes if running(pid)]
print(json.dumps(errors))
'''
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model), str(tmp_path / "odd")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert "head size 16" in errors["head_size"] and "64" in errors["head_size"]
    assert errors["length"] == ("prompt 0 has 40 tokens; with sampling.max_new_tokens=30 that "
                                "exceeds rollout.max_model_len=64")
    assert errors["n"].startswith("sampling.n=0 is invalid")
    assert "before the trainer's weights were loaded" in errors["dummy"]
    assert errors["ready_samples"] == 1 and errors["woken_samples"] == 1
    assert errors["large_round"][0] == 120 and max(errors["large_round"][1]) <= 4, errors["large_round"]
    assert errors["stream_tokens_equal"] and errors["stream_logprob_gap"] < 1e-5
    calls = errors["stream_calls"]
    assert sorted(index for index, _, _ in calls) == list(range(30))
    assert all(n == 4 for _, n, _ in calls)
    assert max(unfinished for _, _, unfinished in calls) > 0, "no prompt was handed over early"
    # A failing callback ends the round; nothing it left queued leaks into the next one.
    assert "scoring broke" in errors["stream_error"] and errors["after_error"] == [1, 0]
    assert "on a sleeping engine" in errors["asleep"]
    assert "load_weights on a sleeping engine" in errors["load_asleep"]
    assert "load_weights outside a sync: start_weight_update first" in errors["outside_sync"]
    assert "start_weight_update must be called before update_weights" in errors["vllm_order"]
    # finish_weight_update(weight_version=...) set what vLLM reports back.
    assert (errors["version_0"], errors["version_1"]) == ("0", "1")
    assert "wake_kv_cache before the weights were loaded" in errors["kv_first"]
    assert "on a sleeping engine" in errors["weights_only"]
    # Every engine process (engine core, its worker, the resource tracker) outlived SIGTERM +
    # SIGUSR1, the trainer's StopRequest saw SIGTERM, and the engine still samples. The
    # trainer's shutdown then ends them all, in vLLM's usual time (its manager waits 5 s for
    # the engine core, then kills it; the same without the block); a leftover SIGTERM-proof
    # worker would outlive it.
    signalled = errors["signalled"]
    assert signalled["cores"] == 1 and signalled["children"] >= 3, signalled
    assert errors["engine_processes"] >= 2  # the engine core and its worker
    assert signalled["alive"] == signalled["children"] and signalled["stop"] == "SIGTERM", signalled
    assert errors["samples_after_sigterm"] == 1
    assert errors["left_after_shutdown"] == [] and errors["shutdown_s"] < 8.0, errors
