"""Checkpoint conversion throughput and peak memory for a ~500M-parameter random Qwen2 model.

Prints, measured in this one run on the same files:
- safetensors read throughput (every tensor read once, the floor for any converter);
- HF -> Megatron and Megatron -> HF conversion throughput (MB of weights / wall second,
  process start included) and each conversion's peak RSS;
- the ratios conversion / read and peak RSS / model size.

    python benchmarks/bench_conversion.py [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_prime.checkpoint.hf_mapping import expected_hf_shapes  # noqa: E402
from megatron_prime.models.architectures import ModelShape  # noqa: E402


def write_random_model(folder: Path, layers: int) -> int:
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
        "intermediate_size": 4096, "num_hidden_layers": layers, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
               for name, shape in expected_hf_shapes(ModelShape.from_hf(config)).items()}
    # Two shards with an index, as HF writes them.
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        file = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in half}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in half})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(t.numel() for t in tensors.values())


def read_all(folder: Path) -> tuple[float, int]:
    start = time.perf_counter()
    nbytes = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                nbytes += handle.get_tensor(name).clone().nbytes
    return time.perf_counter() - start, nbytes


def run_child(args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one conversion process (GNU time reports the RSS)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, *args],
                          check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    peak_kb = int(done.stderr.rsplit("maxrss_kb=", 1)[1].split()[0])
    return seconds, peak_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = write_random_model(tmp / "hf", args.layers)
        read_s, nbytes = read_all(tmp / "hf")
        mb = nbytes / 1e6
        _, baseline_rss = run_child(["-c", "import megatron_prime.checkpoint.convert"])
        to_megatron_s, to_megatron_rss = run_child([
            str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(tmp / "hf"),
            "--output", str(tmp / "megatron")])
        to_hf_s, to_hf_rss = run_child([
            str(REPO / "tools" / "convert_megatron_to_hf.py"), "--checkpoint", str(tmp / "megatron"),
            "--output", str(tmp / "hf_out")])
    print(f"baseline: a Python process that imports megatron_prime peaks at {baseline_rss:.0f} MB")
    print(f"model: {params / 1e6:.0f}M parameters, {mb:.0f} MB in bfloat16, 2 safetensors shards")
    print(f"safetensors read:  {mb / read_s:7.0f} MB/s ({read_s:.1f} s)")
    print(f"HF -> Megatron:    {mb / to_megatron_s:7.0f} MB/s ({to_megatron_s:.1f} s incl. start-up), "
          f"peak RSS {to_megatron_rss:.0f} MB")
    print(f"Megatron -> HF:    {mb / to_hf_s:7.0f} MB/s ({to_hf_s:.1f} s incl. start-up), "
          f"peak RSS {to_hf_rss:.0f} MB")
    print(f"ratio HF->Megatron / read throughput: {read_s / to_megatron_s:.4f}")
    print(f"ratio Megatron->HF / read throughput: {read_s / to_hf_s:.4f}")
    print(f"ratio peak RSS / model size: HF->Megatron {to_megatron_rss / mb:.2f}, "
          f"Megatron->HF {to_hf_rss / mb:.2f}")


if __name__ == "__main__":
    main()
