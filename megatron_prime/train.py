"""The PRIME trainer: the ten steps of ../shared/DESIGN.md, and the loop around them.

``python -m megatron_prime.train CONFIG.yaml trainer.steps=100 algo.beta=0.05`` (under
torchrun or srun for several processes). One step, on every rank:

  1  data/        this replica's shard of a round of prompts       (rollout/collect.py)
  2  bridge       push the policy into vLLM if it changed           (rollout/bridge.py)
  3  engine       n samples per prompt                              (rollout/collect.py)
  4  rewards/     outcome reward per response                       (rollout/collect.py)
  5  algo/filter  keep prompts with accuracy in the band, refill    (rollout/collect.py)
  6  models       old-policy, reference and PRM log-probs           (update.py)
  7  PRM update   cross-entropy on the outcome label                (update.py)
  8  advantages   RLOO outcome + leave-one-out process returns      (update.py)
  9  policy       PPO clipped loss, optimizer step                  (update.py)
 10  log + save   metrics, progress bar, wandb; train-state checkpoint
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from megatron_prime import distributed
from megatron_prime.checkpoint.hf_io import non_weight_files
from megatron_prime.checkpoint.train_state import (
    CheckpointConfig,
    load_train_state,
    resolve_resume,
    save_train_state,
)
from megatron_prime.config import (
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    config_to_dict,
    load_config,
    require,
    require_choice,
    require_output_folder,
    require_positive_int,
    validate_all,
)
from megatron_prime.data import DataConfig, PromptSampler, load_prompts
from megatron_prime.models.architectures import sequence_length_multiple
from megatron_prime.models.builder import BuiltModel, move_to
from megatron_prime.models.offload import RolloutOffload
from megatron_prime.models.optimizer import build_optimizer
from megatron_prime.monitor import LoggingConfig, RunLogger
from megatron_prime.rewards import RewardsConfig
from megatron_prime.rollout.bridge import BridgeConfig, WeightBridge
from megatron_prime.rollout.collect import (
    BatchConfig,
    check_batch_config,
    collect_batch,
)
from megatron_prime.rollout.engine import (
    RolloutConfig,
    RolloutEngine,
    SamplingConfig,
)
from megatron_prime.update import (
    AlgoConfig,
    PhaseTimer,
    PrimeModels,
    check_mini_batches,
    prime_update,
)
from megatron_prime.rollout.validation import ValidationConfig, greedy, run_validation


# ---- the run: configuration, setup and the loop ----

@dataclass
class ModelConfig:
    """The SFT checkpoint policy, PRM and reference all start from (PRIME.md)."""

    # An HF folder (config.json + safetensors + tokenizer) or a megatron_prime Megatron
    # checkpoint (tools/convert_hf_to_megatron.py), at any saved layout.
    path: str = ""
    # The PRM's starting checkpoint (default: path). It may be another, smaller model (e.g.
    # Qwen2.5-1.5B scoring for a 7B policy) as long as it shares the policy's tokenizer: the
    # PRM scores the policy's token ids. Its TP/PP layout is the policy's.
    prm_path: str | None = None
    # The frozen reference of the implicit PRM (the denominator of its reward). None: the
    # PRM's starting checkpoint (prm_path if set, else path), so that log pi_psi - log pi_ref,
    # and with it every implicit reward, is exactly 0 before the first PRM update, as PRIME
    # defines it. Only the PRM reads it (PRIME has no KL term), so it has the PRM's shape.
    reference_path: str | None = None

    def validate(self) -> None:
        require(isinstance(self.path, str) and bool(self.path), "model.path", self.path,
                "the path of an HF folder or a megatron_prime checkpoint")
        for key in ("prm_path", "reference_path"):
            value = getattr(self, key)
            require(value is None or (isinstance(value, str) and bool(value)), f"model.{key}",
                    value, "null or the path of an HF folder or a megatron_prime checkpoint")


@dataclass
class RolloutSettings:
    engine: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)


@dataclass
class TrainerConfig:
    steps: int = 100
    seed: int = 1234
    # NaN/inf guard: a step whose loss or gradient is not finite is skipped; this many
    # skipped steps in a row stop the run.
    max_consecutive_skips: int = 3
    # "auto": GPU when CUDA is available.
    device: str = "auto"
    # Keep the frozen reference in host memory, on the GPU only for its forward pass: frees
    # its bf16 weights (2 bytes/param/TP/PP) for the updates at the cost of one host-to-GPU
    # copy per step (megatron-prime-plan --offload-reference sizes the gain).
    offload_reference: bool = False
    # While the vLLM engine is awake (every rollout and validation), release the gradient
    # buffers and move the optimizer states and the frozen models (the reference; a frozen
    # PRM) to pinned host memory, back after the engine sleeps (models/offload.py): their GPU
    # memory goes to vLLM's KV cache (megatron-prime-plan gives the engine that share).
    offload_during_rollout: bool = True

    def validate(self) -> None:
        require_positive_int("trainer.steps", self.steps)
        require(isinstance(self.offload_during_rollout, bool), "trainer.offload_during_rollout",
                self.offload_during_rollout, "true or false")
        require(isinstance(self.seed, int) and self.seed >= 0, "trainer.seed", self.seed, "an integer >= 0")
        require_positive_int("trainer.max_consecutive_skips", self.max_consecutive_skips)
        require_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class PrimeConfig:
    """The whole run: one YAML file (examples/) plus ``key=value`` overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    # Held-out greedy pass@1 during training (val/accuracy).
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # PRIME.md: policy lr 5e-7, grad clip 1.0; PRM lr 1e-6, grad clip 10; constant, no weight
    # decay. Unused (no PRM optimizer) in algo.prm_mode frozen and outcome_only.
    policy_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    prm_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-6, clip_grad=10.0))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Outcome verifiers: rewards.math.workers checker processes, time limits; the code
    # sandbox at rewards.code.sandbox: backend "local" (namespaces on this node, as root or
    # as an unprivileged user) or "remote" (a SandboxFusion-style service at remote_url, for
    # clusters that allow neither; rewards/sandbox.py).
    rewards: RewardsConfig = field(default_factory=RewardsConfig)

    def validate(self) -> None:
        require(self.rollout.sampling.n == self.algo.num_samples_per_prompt, "rollout.sampling.n",
                self.rollout.sampling.n, f"equal to algo.num_samples_per_prompt="
                f"{self.algo.num_samples_per_prompt}")
        for name in ("policy_optimizer", "prm_optimizer"):
            getattr(self, name).validate(name)
        require(self.prm_optimizer.use_distributed_optimizer
                == self.policy_optimizer.use_distributed_optimizer,
                "prm_optimizer.use_distributed_optimizer", self.prm_optimizer.use_distributed_optimizer,
                "the same value as policy_optimizer.use_distributed_optimizer")
        # The trainer's log-probs are those of the full softmax: a truncated sampler (top-p,
        # top-k) draws from another distribution, so the PPO ratio and the PRM's labels would be
        # off. Validation sampling is separate (greedy).
        sampling = self.rollout.sampling
        require(sampling.top_p == 1.0, "rollout.sampling.top_p", sampling.top_p,
                "1.0 during training (the trainer's log-probs model the untruncated distribution)")
        require(sampling.top_k == -1, "rollout.sampling.top_k", sampling.top_k,
                "-1 during training (the trainer's log-probs model the untruncated distribution)")


class SftCheckpoint(NamedTuple):
    """An opened starting checkpoint: its HF config, the folder holding config.json and the
    tokenizer, and its weight loader (reads nothing until called with a model)."""

    hf_config: dict[str, Any]
    folder: Path
    load: Callable[[BuiltModel], Any]


def _open_sft_checkpoint(path: str, key: str) -> SftCheckpoint:
    """An HF folder or a megatron_prime model checkpoint at ``path`` (``key`` names it in errors)."""
    from megatron_prime.checkpoint.hf_io import HFCheckpoint
    from megatron_prime.checkpoint.hf_mapping import load_hf_weights
    from megatron_prime.checkpoint.model_checkpoint import (
        MANIFEST,
        hf_config_of,
        load_model_checkpoint,
    )

    folder = Path(path)
    if (folder / MANIFEST).is_file():
        return SftCheckpoint(hf_config_of(folder), folder / "hf",
                             lambda model: load_model_checkpoint(model, folder))
    if (folder / "config.json").is_file():
        hf = HFCheckpoint.open(folder)
        return SftCheckpoint(hf.config, folder, lambda model: load_hf_weights(model, hf.tensor))
    raise FileNotFoundError(f"{key}={path!r}: neither an HF model folder (config.json) nor a "
                            f"megatron_prime checkpoint ({MANIFEST}) is there")


def _check_same_tokenizer(policy_folder: Path, other_folder: Path, key: str, path: str) -> None:
    """The PRM scores the policy's token ids: its tokenizer must map every token as the
    policy's does (Qwen2.5 0.5B to 72B share one; their padded vocab sizes differ, which is
    fine)."""
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(str(other_folder))
    except (OSError, ValueError) as error:
        raise ValueError(f"{key}={path!r}: no tokenizer could be loaded from {other_folder} "
                         f"({error}); expected the policy's tokenizer files") from None
    ours = AutoTokenizer.from_pretrained(str(policy_folder)).get_vocab()
    theirs = other.get_vocab()
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])
        raise ValueError(f"{key}={path!r}: its tokenizer is not the policy's (model.path): "
                         f"{len(theirs)} tokens against {len(ours)}, first difference "
                         f"{differ[0][0]!r} -> {differ[0][1]}; the PRM must share the policy's "
                         "tokenizer, since it scores the policy's token ids")


@dataclass(frozen=True)
class ScoringStart:
    """Where the implicit PRM and its reference start, and their (shared) HF config."""

    hf_config: dict[str, Any]
    prm: Callable[[BuiltModel], Any]
    reference: Callable[[BuiltModel], Any]


def open_scoring_start(config: PrimeConfig, policy: SftCheckpoint) -> ScoringStart:
    """The PRM's and the reference's starting checkpoints, checked before any model is built:
    a PRM of another size must share the policy's tokenizer, split under the same TP/PP, and
    hold the rollout's longest sequence; the reference must have the PRM's shape."""
    from megatron_prime.models.architectures import ModelShape

    if not config.model.prm_path:
        prm = policy
    else:
        prm = _open_sft_checkpoint(config.model.prm_path, "model.prm_path")
        _check_same_tokenizer(policy.folder, prm.folder, "model.prm_path", config.model.prm_path)
    key = "model.prm_path" if config.model.prm_path else "model.path"
    path = config.model.prm_path or config.model.path
    try:
        shape = ModelShape.from_hf(prm.hf_config)
        shape.check_layout(config.parallel)
    except ValueError as error:
        raise ValueError(f"{key}={path!r}: {error}") from None
    # The policy's own limit is vLLM's to check (the engine refuses a longer max_model_len).
    if config.model.prm_path and shape.max_position_embeddings < config.rollout.engine.max_model_len:
        raise ValueError(f"{key}={path!r}: max_position_embeddings={shape.max_position_embeddings} "
                         f"is shorter than rollout.engine.max_model_len="
                         f"{config.rollout.engine.max_model_len}, the longest sequence it scores")
    reference = prm.load
    if config.model.reference_path:
        opened = _open_sft_checkpoint(config.model.reference_path, "model.reference_path")
        try:
            # Every field that shapes a weight or the forward pass (not the init scale).
            same = replace(ModelShape.from_hf(opened.hf_config), initializer_range=0.0) \
                == replace(shape, initializer_range=0.0)
        except ValueError:
            same = False
        if not same:
            raise ValueError(
                f"model.reference_path={config.model.reference_path!r} holds "
                f"{opened.hf_config.get('architectures')} of another shape than the PRM's "
                f"({key}={path!r}); expected the PRM's architecture and size, since only the PRM's "
                "log-ratio reads the reference")
        reference = opened.load
    return ScoringStart(prm.hf_config, prm.load, reference)


def build_prime_models(config: PrimeConfig, policy_start: SftCheckpoint) -> PrimeModels:
    """Policy, PRM and reference from their starting checkpoints (``policy_start`` opened by
    ``_open_sft_checkpoint``; the others from config.model), with their optimizers
    (collective). Every check on the PRM's and the reference's checkpoints runs before the
    first model is built."""
    from megatron_prime.models.builder import build_model

    distributed_optimizer = config.policy_optimizer.use_distributed_optimizer
    scoring = open_scoring_start(config, policy_start) if config.algo.uses_prm else None

    def build(hf_config: dict[str, Any], role: str, loader: Any, frozen: bool = False) -> BuiltModel:
        model = build_model(hf_config, role, config.parallel, config.precision,
                            use_distributed_optimizer=distributed_optimizer, initialize_weights=False,
                            frozen=frozen)
        loader(model)
        return model

    policy = build(policy_start.hf_config, "policy", policy_start.load)
    reference = prm = prm_optimizer = None
    if scoring is not None:  # outcome-only RLOO never reads the reference
        # The PRM's own starting point unless set: implicit rewards start at exactly 0.
        reference = build(scoring.hf_config, "reference", scoring.reference)
        if config.trainer.offload_reference:
            move_to(reference, torch.device("cpu"))
        # A frozen PRM (algo.prm_mode=frozen) is built like the reference: forward only, with
        # no gradient buffers and no optimizer.
        prm = build(scoring.hf_config, "prm", scoring.prm, frozen=not config.algo.trains_prm)
        if config.algo.trains_prm:
            prm_optimizer = build_optimizer(prm, config.prm_optimizer)
    models = PrimeModels(policy=policy, reference=reference,
                         policy_optimizer=build_optimizer(policy, config.policy_optimizer),
                         prm=prm, prm_optimizer=prm_optimizer,
                         reference_offloaded=config.trainer.offload_reference)
    trained = [(policy, models.policy_optimizer)]
    frozen = []
    if prm is not None:
        if prm_optimizer is not None:
            trained.append((prm, prm_optimizer))
        else:
            frozen.append(prm)
    if reference is not None and not config.trainer.offload_reference:  # else on the host already
        frozen.append(reference)
    models.rollout_offload = RolloutOffload(trained, frozen, enabled=config.trainer.offload_during_rollout)
    return models


class StopRequest:
    """SIGTERM (SLURM's pre-emption warning, scancel) or SIGUSR1 (``--signal=USR1@90``)
    ask the run to save a checkpoint after the current step and exit."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal (one small all-reduce per step)."""
        flag = torch.tensor([1 if self.signal_name else 0], device=distributed.device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())  # host sync


class NonFiniteGuard:
    """Counts skipped updates in a row and stops the run after ``limit`` of them."""

    def __init__(self, limit: int, consecutive: int = 0) -> None:
        self.limit, self.consecutive = limit, consecutive

    def update(self, step: int, skip_reasons: list[str]) -> None:
        self.consecutive = self.consecutive + 1 if skip_reasons else 0
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"step {step}: {self.consecutive} steps in a row had a non-finite loss or "
                f"gradient (trainer.max_consecutive_skips={self.limit}); last: "
                f"{'; '.join(skip_reasons)}. Lower the learning rates or check the data.")


def _with_times(metrics: dict[str, float], timer: PhaseTimer, num_tokens: float) -> dict[str, float]:
    """The step's metrics with its phase times so far and the training throughput."""
    return {**metrics, **timer.metrics(),
            "throughput/train_tokens_per_s": num_tokens / max(timer.total, 1e-9)}


@dataclass
class RunResult:
    last_step: int
    history: list[dict[str, float]]
    stopped_by: str | None = None  # the signal that stopped the run early
    checkpoint: Path | None = None
    models: PrimeModels | None = None  # the trained models, for a caller that goes on (eval)


def train(config: PrimeConfig, engine_factory: Callable[..., RolloutEngine] = RolloutEngine) -> RunResult:
    """Runs PRIME for ``config.trainer.steps`` steps (collective; every rank calls it).

    ``engine_factory`` builds the replica's rollout engine with RolloutEngine's arguments
    (the CPU simulation of the GPU path passes a stand-in; tests/gpu_simulation.py)."""
    from transformers import AutoTokenizer

    from megatron_prime.rewards import CodeVerifier, RewardRegistry, check_sandbox_available, reward_kind

    validate_all(config)
    run_dir = Path(config.logging.run_dir)
    checkpoint_root = Path(config.checkpoint.dir)
    if not checkpoint_root.is_absolute():
        checkpoint_root = run_dir / checkpoint_root
    # Both are created late (the run folder after vLLM started, checkpoints at the first save).
    require_output_folder("logging.run_dir", config.logging.run_dir, run_dir)
    require_output_folder("checkpoint.dir", config.checkpoint.dir, checkpoint_root)
    use_gpu = None if config.trainer.device == "auto" else config.trainer.device == "cuda"
    if not distributed.is_initialized():
        distributed.init_distributed(config.parallel, seed=config.trainer.seed, use_gpu=use_gpu)
    runtime = distributed.runtime()
    is_logging_rank = runtime.launch.rank == 0

    # Everything that can be wrong with the inputs fails here, before anything is written.
    resume_from = resolve_resume(config.checkpoint, checkpoint_root)
    policy_start = _open_sft_checkpoint(config.model.path, "model.path")
    hf_folder = policy_start.folder
    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder))
    records = load_prompts(config.data, tokenizer)
    val_records = []
    if config.validation.enabled:
        val_records = load_prompts(replace(config.data, paths=config.validation.paths),
                                   tokenizer)[:config.validation.max_prompts]
    val_sampling = greedy(config.rollout.sampling, config.validation.max_new_tokens)
    check_batch_config(config.rollout.batch, distributed.dp_world_size(), len(records))
    check_mini_batches(config.algo, config.rollout.batch.prompts_per_step // distributed.dp_world_size()
                       * config.algo.num_samples_per_prompt, config.rollout.engine.max_model_len)
    # Code prompts need a working sandbox: every rank fails here, in one line naming what is
    # missing (SandboxUnavailable), rather than the reward rank at step 1.
    needs_code = any(reward_kind(record.ability, record.data_source) == "code"
                     for record in (*records, *val_records))
    if needs_code:
        check_sandbox_available(config.rewards.code.sandbox)
    models = build_prime_models(config, policy_start)
    sampler = PromptSampler(records, config.rollout.batch.prompts_per_round, config.data.shuffle_seed,
                            distributed.dp_rank(), distributed.dp_world_size())
    schedulers: dict[str, Any] = {}
    optimizers = {"policy": models.policy_optimizer}
    trained = {"policy": models.policy}
    if models.prm_optimizer is not None:  # a frozen PRM is reloaded from model.prm_path
        optimizers["prm"], trained["prm"] = models.prm_optimizer, models.prm

    start_step, guard, wandb_run_id = 0, NonFiniteGuard(config.trainer.max_consecutive_skips), None
    covered_record = None
    if resume_from is not None:
        start_step, extra = load_train_state(resume_from, trained, optimizers, schedulers)
        sampler.load_state_dict(extra["sampler"])
        guard.consecutive = extra.get("consecutive_skips", 0)
        wandb_run_id = extra.get("wandb_run_id")
        covered_record = extra.get("metrics_record")  # absent in checkpoints of older versions

    # The engine sizes its KV cache from the memory it finds free at start-up: the trainer's
    # gradient buffers (and, on a resumed run, optimizer state) are off the GPU then as at
    # every later wake. Loading left staging buffers in the allocator's cache: vLLM must find
    # them free when it profiles. Placement: the replica's engine sees only the replica's GPUs
    # on the owner's node; the exchange also makes every rank release before any engine starts.
    offload = models.rollout_offload
    offload.release()
    runtime.memory.release_cached()
    slot = distributed.engine_slot(config.rollout.engine.engines_per_replica,
                                   config.rollout.engine.tensor_parallel_size)  # collective
    engine = None
    if slot.index is not None:
        engine = engine_factory(hf_folder, config.rollout.engine, on_gpu=runtime.on_gpu,
                                visible_devices=slot.devices)
    # vLLM sizes its KV cache from the free memory it profiles at start-up: no rank may touch
    # its GPU (not even the bridge's plan exchange) before every engine is up. The others wait
    # on the host, not in NCCL.
    distributed.host_barrier()
    bridge = WeightBridge(models.policy, engine, config.rollout.bridge)
    # A new engine holds dummy weights and a KV cache: it sleeps until the first sync, as
    # verl's hybrid engine does after building its rollout.
    bridge.release_engine()
    offload.restore()
    rewards = None
    if engine is not None:  # code verifier built now when code prompts exist (checked above)
        rewards = RewardRegistry(code=CodeVerifier(config.rewards.code) if needs_code else None,
                                 config=config.rewards)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logger = RunLogger(config.logging, config.trainer.steps, start_step, config_to_dict(config),
                       is_logging_rank, wandb_run_id=wandb_run_id, covered_record=covered_record)
    if resume_from is not None:
        logger.message(f"resumed from {resume_from} at step {start_step}")
    # A PRM from its own checkpoint (maybe another size) keeps that checkpoint's config.json
    # and tokenizer next to its weights, so that its HF export (--role prm) has the PRM's shape.
    role_hf_files = {}
    if "prm" in trained and config.model.prm_path:
        role_hf_files["prm"] = non_weight_files(
            _open_sft_checkpoint(config.model.prm_path, "model.prm_path").folder)
    stop = StopRequest()
    history: list[dict[str, float]] = []
    saved: Path | None = None

    def save(step: int, metrics_record: dict[str, Any]) -> Path:
        extra = {"sampler": sampler.state_dict(), "consecutive_skips": guard.consecutive,
                 "wandb_run_id": logger.wandb_run_id, "config": config_to_dict(config),
                 "metrics_record": metrics_record}
        return save_train_state(checkpoint_root, step, trained, optimizers, schedulers, extra,
                                config.checkpoint.keep_last, hf_files=non_weight_files(hf_folder),
                                role_hf_files=role_hf_files)

    def validation() -> dict[str, float]:
        """Greedy pass@1 of the current policy on the held-out prompts; the engine wakes with
        the policy and goes back to sleep."""
        offload.release()
        bridge.wake_with_policy(version=step)  # the policy after `step` updates
        metrics = run_validation(val_records, engine, tokenizer, rewards, val_sampling,
                                 config.data.use_chat_template, slot)
        bridge.release_engine()
        offload.restore()
        return metrics

    step = start_step
    try:
        if config.validation.enabled and config.validation.before_train and start_step == 0:
            initial = validation()
            logger.log(0, initial)
            history.append({"step": 0, **initial})
        while step < config.trainer.steps:
            step += 1
            timer = PhaseTimer()
            with timer("sync"):  # step 2: the trainer releases its memory, the engine wakes
                offload.release()
                bridge.wake_with_policy(version=step - 1)  # the policy after step - 1 updates
            with timer("rollout"):  # steps 1, 3, 4, 5
                collected = collect_batch(sampler, engine, tokenizer, rewards, config.rollout.sampling,
                                          config.rollout.batch, step, config.trainer.seed,
                                          config.data.use_chat_template, pad_token_id,
                                          sequence_length_multiple(config.parallel, config.precision),
                                          slot)
            metrics = dict(collected.metrics)
            metrics["rollout/engines"] = float(slot.count * distributed.dp_world_size())
            bridge.release_engine()  # the engine sleeps: its GPU memory goes to training
            if offload.enabled:  # back on the GPU before any pass of the update
                metrics.update(_largest_over_ranks(offload.restore().metrics()))
            with timer("update"):  # steps 6-9
                if collected.tokens.batch_size:
                    # FP8 scoring models: their log-ratio error, at the first step and every k.
                    check_fp8 = (step == start_step + 1
                                 or step % config.precision.fp8_error_check_every == 0)
                    update = prime_update(models, collected.tokens, collected.outcome_rewards, config.algo,
                                          temperature=config.rollout.sampling.temperature,
                                          measure_fp8_error=check_fp8)
                    metrics.update(update.metrics)
                    skip_reasons = update.skip_reasons
                else:
                    skip_reasons = []
                    logger.message(f"step {step}: no prompt had an accuracy inside "
                                   f"{config.rollout.batch.filter}; no update")
            if config.validation.due(step, config.trainer.steps):
                with timer("validation"):
                    metrics.update(validation())
            for reason in skip_reasons:
                logger.message(f"step {step}: {reason}")
            metrics["guard/skipped_updates"] = float(len(skip_reasons))
            stop_now = stop.agreed()
            save_due = (config.checkpoint.save_every and step % config.checkpoint.save_every == 0)
            num_tokens = float(collected.tokens.scored_token_mask().sum()) * distributed.dp_world_size()
            if stop_now or save_due or step == config.trainer.steps:
                # The checkpoint keeps this step's line: a kill after it is renamed into place
                # and before the line below is written loses no line (the resume writes it).
                with timer("checkpoint"):  # step 10
                    saved = save(step, RunLogger.record(step, _with_times(metrics, timer, num_tokens)))
            metrics = _with_times(metrics, timer, num_tokens)
            logger.log(step, metrics)
            history.append({"step": step, **metrics})
            guard.update(step, skip_reasons)  # raises after too many skipped steps in a row
            if stop_now:
                logger.message(f"{stop.signal_name}: saved {saved}, stopping at step {step}")
                return RunResult(step, history, stop.signal_name, saved, models)
    finally:
        logger.close()
        if engine is not None:
            engine.shutdown()
    return RunResult(step, history, None, saved, models)


def _largest_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's maximum over every rank (one host-group all-reduce): a rank's offloaded
    bytes depend on its pipeline stage, and every rank logs the same step line."""
    names = sorted(values)
    tensor = torch.tensor([values[name] for name in names], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX,
                                 group=distributed.host_group())
    return dict(zip(names, tensor.tolist()))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m megatron_prime.train [CONFIG.yaml] [key=value ...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = args.pop(0) if args and "=" not in args[0] else None
    try:
        config = load_config(PrimeConfig, path, args)
        result = train(config)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        # Bad input (nothing has been written yet) or the NaN guard: one clear line.
        raise SystemExit(f"error: {error}") from None
    if distributed.is_initialized():
        distributed.destroy_distributed()
    if result.stopped_by:
        # SLURM requeues the job; the next start resumes from the saved checkpoint.
        sys.exit(0)


if __name__ == "__main__":
    main()
