"""Typed configuration for megatron_prime.

Each component owns a dataclass; ``validate()`` raises ``ValueError`` naming the key, the
bad value and what is allowed, so a wrong YAML value fails before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: expected {allowed}")


def require_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    require(value in choices, key, value, f"one of {list(choices)}")


def require_positive_int(key: str, value: Any) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             key, value, "an integer >= 1")


def require_output_folder(key: str, value: Any, path: Any) -> None:
    """Refuses an output folder that could not be created: ``path`` (``value`` of ``key``,
    resolved) or one of its parents is a file, or its nearest existing parent is read-only.

    Checked at start-up because the folder is created late (a checkpoint at the first save,
    a minute in; the run folder after the engines started), where the error names no key."""
    import os
    from pathlib import Path

    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            break
    if not folder.is_dir():
        where = "is a file" if folder == path else f"has a file in its path ({folder})"
        raise ValueError(f"{key}={value!r} is invalid: {path} {where}; expected a folder path")
    if folder != path and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={value!r} is invalid: {path} cannot be created ({folder} is "
                         "not writable); expected a writable folder path")


@dataclass
class ParallelConfig:
    """How each model is split: TP inside a node, PP across nodes, DP is what is left."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    # Interleaved 1F1B: model chunks per pipeline stage (None = plain 1F1B).
    virtual_pipeline_parallel_size: int | None = None
    # Shards LayerNorm/dropout activations over TP ranks; needs TP > 1.
    sequence_parallel: bool = False
    # Activation recomputation (Megatron's recompute_granularity): "none" keeps every
    # activation for the backward pass; "selective" recomputes the attention core (drops
    # the s x s softmax terms); "full" keeps only each recomputed layer's input.
    recompute_granularity: str = "none"
    # With "full": layers per recomputed group (Megatron's "uniform" method): each group
    # keeps its input and is rebuilt as a whole in the backward pass. None = 1 (Megatron-LM's
    # usual setting: the least memory); larger groups store fewer inputs but rebuild more
    # activations at once.
    recompute_num_layers: int | None = None

    def validate(self) -> None:
        require_positive_int("parallel.tensor_parallel_size", self.tensor_parallel_size)
        require_positive_int("parallel.pipeline_parallel_size", self.pipeline_parallel_size)
        require_positive_int("parallel.context_parallel_size", self.context_parallel_size)
        # Not built: the data, the log-prob schedule and the rollout engines would give every
        # CP rank whole sequences (and an engine of its own) instead of a slice of each.
        require(self.context_parallel_size == 1, "parallel.context_parallel_size",
                self.context_parallel_size, "1: context parallelism is not built yet (every CP "
                "rank would get whole sequences); use tensor or pipeline parallelism")
        if self.virtual_pipeline_parallel_size is not None:
            require_positive_int(
                "parallel.virtual_pipeline_parallel_size", self.virtual_pipeline_parallel_size
            )
            require(self.pipeline_parallel_size > 1, "parallel.virtual_pipeline_parallel_size",
                     self.virtual_pipeline_parallel_size,
                     "None unless parallel.pipeline_parallel_size > 1")
        if self.sequence_parallel:
            require(self.tensor_parallel_size > 1, "parallel.sequence_parallel", True,
                     "False unless parallel.tensor_parallel_size > 1")
        require_choice("parallel.recompute_granularity", self.recompute_granularity,
                       ("none", "selective", "full"))
        if self.recompute_num_layers is not None:
            require_positive_int("parallel.recompute_num_layers", self.recompute_num_layers)
            require(self.recompute_granularity == "full", "parallel.recompute_num_layers",
                    self.recompute_num_layers, "None unless parallel.recompute_granularity='full'")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size


@dataclass
class PrecisionConfig:
    """Numerics. On CPU everything runs in float32 and FP8 must be off."""

    # "auto": bf16 on GPU, float32 on CPU.
    dtype: str = "auto"
    # FP8 through Transformer Engine (GPU only): off, delayed scaling or current scaling.
    fp8_recipe: str = "off"
    # "hybrid": e4m3 forward, e5m2 backward; "e4m3": e4m3 both ways.
    fp8_format: str = "hybrid"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # The models that run their GEMMs in FP8 when fp8_recipe is not "off". The PRM and the
    # reference stay in bf16 unless listed: the implicit reward beta * (log pi_psi - log
    # pi_ref) is a difference of two log-probs, and FP8's error on each is of the size of that
    # difference. Listing either makes the trainer measure that error (fp8_error_check_every).
    fp8_roles: list[str] = field(default_factory=lambda: ["policy"])
    # With the PRM or the reference in FP8: every this many steps (and at a run's first step)
    # the batch is scored again with FP8 off, and reward/fp8_log_ratio_error_{max,mean}
    # (|FP8 - bf16| of log pi_psi - log pi_ref per scored token) is logged next to the rewards,
    # with reward/fp8_log_ratio_abs_mean (the bf16 signal's size) to compare it with. Costs one
    # extra forward pass per FP8 scoring model on those steps.
    fp8_error_check_every: int = 10
    # Which layer implementations: "auto" is Transformer Engine on GPU (fused kernels, FP8,
    # flash attention) and Megatron's local spec on CPU; "local" forces Megatron's own layers
    # on GPU too (a GPU without Transformer Engine; no FP8).
    layer_spec: str = "auto"
    # The local spec's core attention (CPU, a GPU without Transformer Engine, or
    # layer_spec=local): "sdpa" is torch's fused scaled-dot-product kernel (flash or
    # memory-efficient attention on CUDA; models/attention.py), "unfused" Megatron's own
    # DotProductAttention (the [b, heads, s, s] scores in memory; kept for comparison).
    local_attention: str = "sdpa"

    def validate(self) -> None:
        require_choice("precision.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        require_choice("precision.fp8_recipe", self.fp8_recipe, ("off", "delayed", "current"))
        require_choice("precision.fp8_format", self.fp8_format, ("hybrid", "e4m3"))
        require_positive_int("precision.fp8_amax_history_len", self.fp8_amax_history_len)
        require_choice("precision.fp8_amax_compute_algo", self.fp8_amax_compute_algo,
                       ("max", "most_recent"))
        require_choice("precision.layer_spec", self.layer_spec, ("auto", "local"))
        require_choice("precision.local_attention", self.local_attention, ("sdpa", "unfused"))
        require(isinstance(self.fp8_roles, list)
                and all(role in ("policy", "prm", "reference") for role in self.fp8_roles)
                and len(set(self.fp8_roles)) == len(self.fp8_roles), "precision.fp8_roles",
                self.fp8_roles, "a list of distinct roles from ['policy', 'prm', 'reference']")
        require_positive_int("precision.fp8_error_check_every", self.fp8_error_check_every)
        require(self.fp8_recipe == "off" or self.layer_spec == "auto", "precision.fp8_recipe",
                self.fp8_recipe, "'off' with precision.layer_spec='local' (FP8 needs Transformer "
                "Engine's layers)")


@dataclass
class OptimizerConfig:
    """Adam via Megatron's optimizer; defaults are PRIME's policy settings (PRIME.md)."""

    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Global grad-norm clip; 0 disables clipping (the norm is still reported).
    clip_grad: float = 1.0
    # Shards optimizer state (and the fp32 master weights) across data-parallel ranks.
    use_distributed_optimizer: bool = False

    def validate(self, prefix: str = "optimizer") -> None:
        require(self.lr > 0, f"{prefix}.lr", self.lr, "a float > 0")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.adam_beta1 < 1, f"{prefix}.adam_beta1", self.adam_beta1, "in [0, 1)")
        require(0 <= self.adam_beta2 < 1, f"{prefix}.adam_beta2", self.adam_beta2, "in [0, 1)")
        require(self.adam_eps > 0, f"{prefix}.adam_eps", self.adam_eps, "a float > 0")
        require(self.clip_grad >= 0, f"{prefix}.clip_grad", self.clip_grad, ">= 0 (0 = off)")


# ---- YAML + command-line overrides into nested dataclasses ----

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, base: Any = None) -> Any:
    """Checks ``value`` against the annotation ``tp``; builds nested dataclasses (on top of
    ``base``, the field's current value, when it is one)."""
    import dataclasses
    import types
    import typing

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ValueError:
                continue
        raise ValueError(f"{key}={value!r} is invalid: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r} is invalid: expected a mapping of {tp.__name__} fields")
        return config_from_dict(tp, value, prefix=f"{key}.",
                                base=base if isinstance(base, tp) else None)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} is invalid: expected a list")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r} is invalid: expected a mapping")
        return dict(value)
    if tp is float:
        # YAML 1.1 (PyYAML) reads "1e-3" as a string: only "1.0e-3" is a float there.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={value!r} is invalid: expected a number")
        return float(value)
    if tp in (int, bool, str):
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
            raise ValueError(f"{key}={value!r} is invalid: expected {tp.__name__}")
        return value
    return value


def config_from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Builds dataclass ``cls`` from a (nested) mapping; unknown keys and wrong types are
    errors naming the dotted key, the value and what is allowed.

    Keys absent from ``data`` keep their values in ``base`` (default: ``cls()``), so a
    parent's own defaults for a nested config (a demo's shorter SFT, say) survive a partial
    override of that config."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]} is not a known key: expected one of "
                         f"{[prefix + name for name in fields]}")
    base = base if base is not None else cls()
    kwargs = {name: _coerce(prefix + name, value, hints[name], getattr(base, name))
              for name, value in data.items()}
    return dataclasses.replace(base, **kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain data (tuples as lists) that YAML can write and ``config_from_dict`` read back."""
    import dataclasses

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``trainer.steps=100 algo.beta=0.05`` style overrides; values are parsed as YAML."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {override!r} is invalid: expected dotted.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return data


def require_finite_floats(config: Any, prefix: str = "") -> None:
    """Refuses NaN and +-inf in every float of a config tree, naming the dotted key.

    YAML reads ``.inf``/``.nan`` (and ``float()`` reads ``inf``) as floats, and no hyper-
    parameter here means anything at infinity: ``algo.beta=.inf`` made every update NaN, each
    step was skipped and an untrained model was saved with exit code 0. One walk over the
    tree covers every float field, present and future, instead of a check per field."""
    import dataclasses
    import math

    def walk(value: Any, key: str) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{key}[{i}]")
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value!r} is invalid: expected a finite number "
                             "(not NaN or infinity)")

    walk(config, prefix)


def validate_all(config: Any) -> None:
    """Refuses non-finite floats anywhere in the tree, then calls ``validate()`` on the
    config and every nested config that has one."""
    require_finite_floats(config)
    _validate_tree(config)


def _validate_tree(config: Any) -> None:
    import dataclasses

    if hasattr(config, "validate"):
        config.validate()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value)


def load_config(cls: type, path: str | None = None, overrides: Iterable[str] = ()) -> Any:
    """YAML file (optional) + overrides -> validated ``cls``."""
    from pathlib import Path

    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file not found: {file}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{file}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a mapping at the top level, got {type(data).__name__}")
    config = config_from_dict(cls, apply_overrides(data, overrides))
    validate_all(config)
    return config


def save_config(config: Any, path: str) -> None:
    """Writes the resolved config (saved with every run and checkpoint)."""
    from pathlib import Path

    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
