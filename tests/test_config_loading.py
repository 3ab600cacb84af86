"""YAML + dotted overrides into the nested dataclass configs, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from megatron_prime.config import (
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    save_config,
)


@dataclass
class RunConfig:
    name: str = "run"
    steps: int = 10
    beta: float = 0.05
    stop: tuple[str, ...] = ()
    seed: int | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 20\nparallel:\n  tensor_parallel_size: 2\noptimizer:\n  lr: 1.0e-6\n")
    config = load_config(RunConfig, path, ["parallel.pipeline_parallel_size=4", "beta=1",
                                           'stop=["</s>", "\\n\\n"]', "seed=7", "name=exp 1"])
    assert (config.steps, config.beta, config.seed, config.name) == (20, 1.0, 7, "exp 1")
    assert config.stop == ("</s>", "\n\n")
    assert (config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size) == (2, 4)
    assert config.optimizer.lr == 1e-6 and config.optimizer.clip_grad == 1.0  # default kept
    assert isinstance(config.beta, float)


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(RunConfig, None, ["stop=[a, b]", "precision.fp8_recipe=delayed"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(RunConfig, tmp_path / "resolved.yaml") == config
    assert config_to_dict(config)["stop"] == ["a", "b"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tensor_paralel_size=2"],
     r"parallel.tensor_paralel_size is not a known key: expected one of \['parallel.tensor_parallel_size'"),
    (["steps=ten"], r"steps='ten' is invalid: expected int"),
    (["steps=true"], r"steps=True is invalid: expected int"),
    (["beta=[1]"], r"beta=\[1\] is invalid: expected a number"),
    (["parallel=3"], r"parallel=3 is invalid: expected a mapping of ParallelConfig fields"),
    (["precision.fp8_recipe=fast"], r"precision.fp8_recipe='fast' is invalid: expected one of"),
    (["parallel.tensor_parallel_size=0"], r"parallel.tensor_parallel_size=0 is invalid"),
    (["steps"], r"override 'steps' is invalid: expected dotted.key=value"),
    (["steps.x=1"], r"steps={'x': 1} is invalid: expected int"),
    (["parallel.recompute_granularity=some"],
     r"parallel.recompute_granularity='some' is invalid: expected one of \['none', 'selective', 'full'\]"),
    (["parallel.recompute_num_layers=2"],
     r"parallel.recompute_num_layers=2 is invalid: expected None unless parallel.recompute_granularity='full'"),
    (["precision.layer_spec=local", "precision.fp8_recipe=delayed"],
     r"precision.fp8_recipe='delayed' is invalid: expected 'off' with precision.layer_spec='local'"),
    (["parallel.context_parallel_size=2"],
     r"parallel.context_parallel_size=2 is invalid: expected 1: context parallelism is not "
     r"built yet"),
])
def test_bad_values_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(RunConfig, None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["rollout.sampling.top_p=0.9"],
     r"rollout.sampling.top_p=0.9 is invalid: expected 1.0 during training \(the trainer's "
     r"log-probs model the untruncated distribution\)"),
    (["rollout.sampling.top_k=50"], r"rollout.sampling.top_k=50 is invalid: expected -1 during training"),
    (["model.reference_path=''"],
     r"model.reference_path='' is invalid: expected null or the path of an HF folder"),
])
def test_prime_config_refuses_what_training_does_not_honour(overrides, message):
    from megatron_prime.train import PrimeConfig

    with pytest.raises(ValueError, match=message):
        load_config(PrimeConfig, None, ["model.path=sft", *overrides])


def test_prime_config_defaults_sample_untruncated_and_reference_the_prm_start():
    from megatron_prime.rollout.validation import greedy
    from megatron_prime.train import PrimeConfig

    config = load_config(PrimeConfig, None, ["model.path=sft", "model.prm_path=prm",
                                           "data.paths=[rl.jsonl]"])
    sampling = config.rollout.sampling
    assert (sampling.top_p, sampling.top_k, sampling.temperature) == (1.0, -1, 1.0)
    assert config.model.reference_path is None
    # Validation keeps its own (greedy) sampling, derived from the training one.
    validation = greedy(sampling, None)
    assert (validation.n, validation.temperature, validation.top_p, validation.top_k) == (1, 0.0, 1.0, -1)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML"):
        load_config(RunConfig, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: expected a mapping at the top level, got list"):
        load_config(RunConfig, bad)


def test_overrides_do_not_modify_the_input():
    data = {"parallel": {"tensor_parallel_size": 2}}
    assert apply_overrides(data, ["parallel.tensor_parallel_size=4"]) == {
        "parallel": {"tensor_parallel_size": 4}}
    assert data == {"parallel": {"tensor_parallel_size": 2}}


@pytest.mark.parametrize("override, key", [
    ("algo.beta=.inf", "algo.beta"),
    ("algo.beta=-.inf", "algo.beta"),
    ("algo.beta=inf", "algo.beta"),  # a string YAML leaves to float()
    ("policy_optimizer.lr=.nan", "policy_optimizer.lr"),
    ("rollout.sampling.temperature=.inf", "rollout.sampling.temperature"),
])
def test_non_finite_floats_are_refused_naming_the_key(override, key):
    from megatron_prime.train import PrimeConfig

    with pytest.raises(ValueError, match=rf"^{key}=(inf|-inf|nan) is invalid: expected a finite number"):
        load_config(PrimeConfig, None, ["model.path=sft", "data.paths=[rl.jsonl]", override])


def test_non_finite_float_of_a_config_built_in_code_is_refused():
    from megatron_prime.config import validate_all

    config = RunConfig(optimizer=OptimizerConfig(clip_grad=float("inf")))
    with pytest.raises(ValueError, match=r"^optimizer.clip_grad=inf is invalid: expected a finite number"):
        validate_all(config)
