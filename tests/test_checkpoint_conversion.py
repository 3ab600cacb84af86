"""HF <-> Megatron conversion at TP/PP layouts: logits match transformers, the round trip is
bit-identical, the exported folder loads and generates with plain transformers, and bad
input is refused with a one-line error before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_fixtures import save_tiny_model
from launch import REPO, torchrun
from megatron_prime.checkpoint.hf_io import HFCheckpoint

LAYOUTS = {"tp1pp1": (1, 1), "tp2pp1": (2, 1), "tp1pp2": (1, 2), "tp2pp2": (2, 2)}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for arch in ("qwen2", "llama"):
        save_tiny_model(arch, root / arch)
    return root


def load_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


_roundtrips: dict[tuple[str, str], Path] = {}


def roundtrip(hf_models: Path, arch: str, layout: str, tmp_path_factory) -> Path:
    key = (arch, layout)
    if key not in _roundtrips:
        tp, pp = LAYOUTS[layout]
        work = tmp_path_factory.mktemp(f"{arch}_{layout}")
        torchrun("tests/workers/convert_worker.py", tp * pp, [
            "--mode", "roundtrip", "--hf-dir", str(hf_models / arch),
            "--megatron-dir", str(work / "megatron"), "--hf-out", str(work / "hf_out"),
            "--logits-out", str(work / "logits.pt"), "--tp", str(tp), "--pp", str(pp)])
        _roundtrips[key] = work
    return _roundtrips[key]


def hf_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


# Qwen2 (QKV bias, untied) at every layout; Llama (no bias, tied embeddings) at TP2 x PP2,
# the layout that splits every tensor and puts the tied embedding and head on different
# stages, which covers what its other layouts would: three torchrun launches fewer.
ROUNDTRIPS = [("qwen2", layout) for layout in LAYOUTS] + [("llama", "tp2pp2")]


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout", ROUNDTRIPS, ids=[f"{l}-{a}" for a, l in ROUNDTRIPS])
def test_convert_roundtrip(arch, layout, hf_models, tmp_path_factory):
    work = roundtrip(hf_models, arch, layout, tmp_path_factory)
    source = hf_models / arch

    # Megatron logits (TP-gathered, padding removed) equal transformers' on the same input.
    dumped = torch.load(work / "logits.pt")
    torch.testing.assert_close(dumped["logits"], hf_logits(source, dumped["input_ids"]),
                               atol=1e-4, rtol=0)

    # Back to HF: every tensor bit-identical, nothing extra, nothing missing.
    original, exported = load_hf_tensors(source), load_hf_tensors(work / "hf_out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    index = json.loads((work / "hf_out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several shards, named HF-style
    assert all(f.startswith("model-") for f in index["weight_map"].values())

    # Plain transformers loads it and greedy generation is unchanged.
    tokenizer = AutoTokenizer.from_pretrained(work / "hf_out")
    prompt = tokenizer("Solve 3 + 4 =", return_tensors="pt")
    generated = []
    for folder in (source, work / "hf_out"):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        generated.append(model.generate(**prompt, max_new_tokens=8, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id))
    assert torch.equal(generated[0], generated[1])
    assert (work / "hf_out" / "generation_config.json").is_file()
    assert not any(p.name.startswith(".") for p in work.iterdir())  # no staging left behind


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_pp2_loads_at_tp1_pp1(hf_models, tmp_path_factory):
    work = roundtrip(hf_models, "qwen2", "tp2pp2", tmp_path_factory)
    out = work / "logits_tp1pp1.pt"
    torchrun("tests/workers/convert_worker.py", 1, [
        "--mode", "logits", "--megatron-dir", str(work / "megatron"), "--logits-out", str(out)])
    resharded = torch.load(out)["logits"]
    # Bit-identical to the checkpoint converted directly at TP=1/PP=1 (same weights, same
    # layout, same arithmetic) ...
    direct = torch.load(roundtrip(hf_models, "qwen2", "tp1pp1", tmp_path_factory) / "logits.pt")
    assert torch.equal(resharded, direct["logits"])
    # ... and equal to TP=2/PP=2's own logits up to the all-reduce summation order.
    torch.testing.assert_close(resharded, torch.load(work / "logits.pt")["logits"],
                               atol=1e-5, rtol=0)


# ---- bad input: refused up front, one line, nothing written ----

def corrupt(folder: Path, how: str) -> None:
    if how == "architecture":
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["MambaForCausalLM"]
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "missing_shard":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        tensors = load_file(folder / "model-00001-of-00002.safetensors")
        weight_map = {name: ("model-00001-of-00002.safetensors" if i % 2 else
                             "model-00002-of-00002.safetensors") for i, name in enumerate(tensors)}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif how == "wrong_shape":
        from safetensors.torch import save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
        save_file(tensors, folder / "model.safetensors")
    elif how == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])


BAD_INPUTS = {
    "architecture": r"config.json: config.json field 'architectures'=\['MambaForCausalLM'\]",
    "missing_shard": r"model-00002-of-00002.safetensors: shard named in .* is missing",
    "wrong_shape": r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape "
                   r"\(127, 64\), config.json implies \(128, 64\)",
    "truncated": r"model.safetensors: truncated safetensors file",
}


@pytest.fixture
def fresh_model(tmp_path):
    folder = tmp_path / "model"
    save_tiny_model("qwen2", folder)
    return folder


@pytest.mark.parametrize("how", list(BAD_INPUTS))
def test_bad_hf_input_is_refused_before_writing(how, fresh_model):
    corrupt(fresh_model, how)
    with pytest.raises((ValueError, FileNotFoundError), match=BAD_INPUTS[how]):
        HFCheckpoint.open(fresh_model)


def run_cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_errors_are_one_line_and_write_nothing(fresh_model, tmp_path):
    output = tmp_path / "megatron"
    # A TP size that does not divide the heads.
    done = run_cli("convert_hf_to_megatron.py", "--hf-dir", str(fresh_model), "--output",
                   str(output), "--tp", "3")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: model field num_attention_heads=4 is not divisible by "
        "parallel.tensor_parallel_size=3; expected tensor_parallel_size to divide 4 "
        "(e.g. one of [1, 2, 4])"]
    # A truncated shard.
    corrupt(fresh_model, "truncated")
    done = run_cli("convert_hf_to_megatron.py", "--hf-dir", str(fresh_model), "--output", str(output))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "truncated safetensors file" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


@pytest.mark.slow
def test_cli_converts_and_keeps_an_existing_output(tmp_path):
    source = tmp_path / "hf"
    save_tiny_model("llama", source)
    output = tmp_path / "megatron"
    done = run_cli("convert_hf_to_megatron.py", "--hf-dir", str(source), "--output", str(output))
    assert done.returncode == 0, done.stderr
    assert "tensors" in done.stdout and "MB/s" in done.stdout  # progress is printed
    manifest = json.loads((output / "megatron_prime.json").read_text())
    assert manifest["hf_architecture"] == "LlamaForCausalLM"
    before = sorted(p.name for p in (output / "model").iterdir())
    # A second conversion to the same target refuses instead of clobbering it.
    done = run_cli("convert_hf_to_megatron.py", "--hf-dir", str(source), "--output", str(output))
    assert done.returncode == 2 and "already exists" in done.stderr
    assert sorted(p.name for p in (output / "model").iterdir()) == before
    # Export errors name the problem too: a folder that is not a checkpoint.
    done = run_cli("convert_megatron_to_hf.py", "--checkpoint", str(source), "--output",
                   str(tmp_path / "out"))
    assert done.returncode == 2 and "is not a megatron_prime model checkpoint" in done.stderr
    assert not (tmp_path / "out").exists()
    # --role picks a trained model of a training checkpoint; a model checkpoint has one role.
    done = run_cli("convert_megatron_to_hf.py", "--checkpoint", str(output), "--role", "prm",
                   "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--role=prm is for training checkpoints (step_* folders)" in done.stderr
    assert not (tmp_path / "out").exists()


def test_training_checkpoint_export_errors_name_what_is_missing(tmp_path):
    """A step folder's marker lists its trained models; its hf/ folder holds the config."""
    from megatron_prime.checkpoint.convert import check_trained_model

    step = tmp_path / "step_00000004"
    step.mkdir()
    (step / "train_state.json").write_text(json.dumps(
        {"format_version": 1, "step": 4, "models": ["policy"], "model_dtypes": {"policy": "float32"}}))
    with pytest.raises(ValueError, match=r"--role=prm: .*step_00000004 holds the trained models \['policy'\]"):
        check_trained_model(step, "prm")
    with pytest.raises(FileNotFoundError, match="hf/config.json: not found; this training checkpoint "
                                                "does not carry its model's config"):
        check_trained_model(step, "policy")
    (step / "hf").mkdir()
    (step / "hf" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    config, dtype = check_trained_model(step, "policy")
    assert config == {"model_type": "qwen2"} and dtype == torch.float32


def test_streaming_shard_writer_files_load_with_safetensors(tmp_path):
    """Headers written before the data: safetensors' own reader gets every tensor back, split
    into files at max_shard_bytes as planned; a tensor out of plan is refused by name."""
    from safetensors.torch import load_file

    from megatron_prime.checkpoint.hf_io import SafetensorsShardWriter

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(4, 8), "b.bias": torch.randn(8), "c.weight": torch.randn(16, 8),
               "d.empty": torch.zeros(0, 8)}
    plan = [(name, tuple(t.shape)) for name, t in tensors.items()]
    # bfloat16: 64 + 16 bytes fit one 100-byte file; c (256 bytes) fills its own, so d starts
    # a third.
    writer = SafetensorsShardWriter(tmp_path, 3, 100, torch.bfloat16, plan)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.flush()
    assert writer.files == [("part-00003-00000.safetensors", ["a.weight", "b.bias"]),
                            ("part-00003-00001.safetensors", ["c.weight"]),
                            ("part-00003-00002.safetensors", ["d.empty"])]
    loaded = {k: v for f, _ in writer.files for k, v in load_file(tmp_path / f).items()}
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name

    other = SafetensorsShardWriter(tmp_path / "x", 0, 100, torch.float32, plan)
    with pytest.raises(ValueError, match=r"got 'b.bias' \(8,\), planned 'a.weight' \(4, 8\)"):
        other.add("b.bias", tensors["b.bias"])
    half = SafetensorsShardWriter(tmp_path, 1, 1000, torch.float32, plan)
    half.add("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="1 of 4 planned tensors written"):
        half.flush()


@pytest.mark.slow
def test_hf_to_megatron_holds_one_layer_not_the_model(tmp_path):
    """A 12-layer, ~600 MB float32 model converts with a peak RSS growth well under half the
    model: the Megatron side is written one layer at a time (the largest unit here is a layer
    of ~45 MB: its HF tensors, its Megatron tensors and the checkpoint writer's copy)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hf_fixtures import save_tokenizer

    source = tmp_path / "hf"
    config = Qwen2Config(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
                         architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(source)
    save_tokenizer(source, vocab_size=290)
    model_bytes = sum(t.numel() * t.element_size() for t in load_hf_tensors(source).values())
    # VmHWM, not ru_maxrss: the latter keeps the forking pytest process's peak across exec.
    code = r'''
import json, os, sys
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
if __name__ == "__main__":
    from megatron_prime import distributed
    from megatron_prime.checkpoint.convert import convert_hf_to_megatron
    from megatron_prime.config import ParallelConfig
    distributed.init_distributed(ParallelConfig())
    start = rss()
    convert_hf_to_megatron(sys.argv[1], sys.argv[2], ParallelConfig())
    print(json.dumps({"start": start, "peak": peak()}))
'''
    script = tmp_path / "convert.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "megatron")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    assert model_bytes > 550e6
    growth = memory["peak"] - memory["start"]
    assert growth < 0.4 * model_bytes, (memory, growth, model_bytes, done.stdout[-2000:])
    assert (tmp_path / "megatron" / "model" / ".metadata").is_file()
