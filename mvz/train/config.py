"""Typed training configs: dataclasses, YAML files, dotted overrides (``--set training.lr=5e-5``).

Unknown keys and wrong types are :class:`~mvz.errors.ConfigError`\\ s (one line, exit 2 in the CLI).
Key names follow the upstream MVC-ZigAL Hydra configs (``mvczigal.md`` §9) where they exist there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mvz.errors import ConfigError

METHODS = ("mvczigal", "mv_zigal", "ws_zigal", "mv_rdl", "mv_pg")
OBJECTIVES = ("constrained", "weighted", "joint", "per_view")
# method -> (rollout pairing, loss, default objective)
METHOD_TABLE: dict[str, tuple[str, str, str]] = {
    "mvczigal": ("zigzag", "regression", "constrained"),  # the paper's method
    "mv_zigal": ("zigzag", "regression", "joint"),  # zigzag pairs, joint reward only
    "ws_zigal": ("zigzag", "regression", "weighted"),  # fixed weight instead of lambda
    "mv_rdl": ("standard", "regression", "joint"),  # two standard rollouts per prompt
    "mv_pg": ("single", "pg", "joint"),  # policy gradient, PPO-style clipped ratio
}
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class ModelConfig:
    name: str = "sdxl-lcm"  # a model preset (tiny, sdxl-lcm) or an assembled model folder
    random_weights: bool = False
    base_model: str | None = None
    unet_model: str | None = None
    vae_model: str | None = None
    adapter: str | None = None


@dataclass
class PromptConfig:
    prompt_set: str = "simple_animals"  # a shipped set (simple_animals) or a prompt file path


@dataclass
class RewardConfig:
    reward_fn: str = "pickscore"  # per-view reward R (registry name)
    mv_reward_fn: str = "hyperscore"  # joint (6-view set) reward R_mv: its per_set output (HyperScore overall)
    preset: str | None = None  # "tiny": random tiny reward weights (tests, CI)
    reward_checkpoint: str | None = None
    mv_reward_checkpoint: str | None = None
    dtype: str = "fp32"  # upstream scores in fp32


@dataclass
class TrainingConfig:
    method: str = "mvczigal"
    objective: str | None = None  # null: the method's default (see METHOD_TABLE)
    # generation
    resolution: int = 768
    num_views: int = 6
    num_inference_steps: int = 8
    guidance_scale: float = 7.0
    inv_guidance_scale: float = 1.0  # ZMV zag guidance (w = 0)
    zmv_steps: int = 1  # ZMV lambda_step
    zmv_repeats: int = 1  # ZMV T_max
    train_last_step: bool = True  # upstream trains the last (reward-irrelevant) noisy action too
    # batch arithmetic
    sample_batch_size_per_gpu: int = 4
    num_sample_iters: int = 1
    batches_per_epoch: int = 10
    num_epochs: int = 70
    train_batch_size_per_gpu: int = 1
    num_inner_epochs: int = 1
    gradient_accumulation_steps: int = 32
    # optimiser
    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 5.0
    clip_range: float = 1e-4
    adv_clip_max: float = 10.0  # used by mv_pg only (upstream: unused)
    # LoRA
    lora_rank: int = 16
    lora_alpha: float | None = None  # null: = rank (scale 1)
    lora_scale: float = 1.0
    # constraint (Lagrangian)
    lambda_init: float = 0.0
    lambda_lr: float = 0.1
    lambda_max: float | None = 5.0  # 0 or null: no upper cap (upstream: ``lambda_max if lambda_max else None``)
    lambda_update_delay_steps: int = 0
    ema_beta: float = 0.99
    constrain_threshold_init: float = 0.0
    ws_weight: float = 0.5  # WS-ZigAL fixed weight w
    # precision / memory
    mixed_precision: str = "fp16"  # no | fp16 | bf16 (frozen weights in this dtype, LoRA in fp32)
    allow_tf32: bool = True
    gradient_checkpointing: bool = True
    vae_batch: int = 6  # decode at most this many views at once (VAE slicing)
    split_pair_forward: bool = False  # true: one UNet call per trajectory (lower peak memory) instead of one per pair
    # bookkeeping
    seed: int = 42
    save_interval: int = 1


@dataclass
class LoggingConfig:
    sample_prompts: list[str] = field(default_factory=list)  # empty: the first 2 prompts of the set
    sample_seed: int = 0
    sample_grid: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "mvczigal"


# (training keys, predicate, what the message says they must be), checked in this order by validate()
_TRAINING_BOUNDS: tuple[tuple[tuple[str, ...], typing.Callable[[Any], bool], str], ...] = (
    (("resolution", "num_views", "num_inference_steps", "sample_batch_size_per_gpu", "num_sample_iters",
      "batches_per_epoch", "num_epochs", "gradient_accumulation_steps", "lora_rank", "save_interval",
      "zmv_repeats", "num_inner_epochs", "vae_batch"), lambda v: v >= 1, "be at least 1"),
    (("lr", "clip_range", "max_grad_norm", "adam_epsilon"), lambda v: v > 0, "be positive"),
    (("lambda_lr", "lambda_init", "weight_decay", "zmv_steps", "lambda_update_delay_steps",
      "ws_weight"), lambda v: v >= 0, "not be negative"),
)


@dataclass
class TrainConfig:
    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- derived ----------------------------------------------------------------------------------
    @property
    def pairing(self) -> str:
        return METHOD_TABLE[self.training.method][0]

    @property
    def loss_kind(self) -> str:
        return METHOD_TABLE[self.training.method][1]

    @property
    def objective(self) -> str:
        return self.training.objective or METHOD_TABLE[self.training.method][2]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, ignore: tuple[str, ...] = ()) -> str:
        flat = {k: v for k, v in flatten(self.to_dict()).items() if k not in ignore}
        return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> TrainConfig:
        t = self.training
        if t.method not in METHODS:
            raise ConfigError(f"training.method {t.method!r} is not known.", f"Use one of {', '.join(METHODS)}.")
        if t.objective is not None and t.objective not in OBJECTIVES:
            raise ConfigError(f"training.objective {t.objective!r} is not known.", f"Use one of {', '.join(OBJECTIVES)} or null.")
        if t.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"training.mixed_precision {t.mixed_precision!r} is not known.", "Use no, fp16 or bf16.")
        for keys, ok, what in _TRAINING_BOUNDS:
            for key in keys:
                if not ok(getattr(t, key)):
                    raise ConfigError(f"training.{key} must {what}, got {getattr(t, key)}.")
        if not 1 <= t.num_inference_steps <= 50:
            raise ConfigError(f"training.num_inference_steps must be in 1..50, got {t.num_inference_steps}.")
        if t.num_inference_steps == 1 and not t.train_last_step:
            raise ConfigError("with 1 inference step, training.train_last_step=false leaves nothing to train.")
        if t.train_batch_size_per_gpu != 1:
            raise ConfigError("training.train_batch_size_per_gpu must be 1 (one prompt pair per micro-step, as upstream).")
        if not 0 <= t.ema_beta <= 1:
            raise ConfigError(f"training.ema_beta must be in [0, 1], got {t.ema_beta}.")
        if t.lambda_max is not None and t.lambda_max < 0:
            raise ConfigError(f"training.lambda_max must not be negative, got {t.lambda_max}.",
                              "Use a positive cap, or 0 / null for no cap (as upstream).")
        if t.lambda_max and t.lambda_init > t.lambda_max:
            raise ConfigError(f"training.lambda_init {t.lambda_init} exceeds training.lambda_max {t.lambda_max}.")
        if not self.prompts.prompt_set.strip():
            raise ConfigError("prompts.prompt_set is empty.", "Name a shipped set (simple_animals) or a prompt file.")
        return self


# ---- (de)serialisation with type checks ---------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # X | None: X's own message (e.g. "must be a finite number")
            raise errors[0]
        raise ConfigError(f"config key {key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}.")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be a list, got {value!r}.")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan / inf would pass every range check below and poison the run
                raise ConfigError(f"config key {key} must be a finite number, got {value!r}.",
                                  "Fix the value in the YAML file or the --set override.")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {key} must be {_type_name(tp)}, got {value!r}.",
                      "Fix the value in the YAML file or the --set override.")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or '(top level)'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}.",
                          f"Valid keys{' in ' + prefix if prefix else ''}: {', '.join(sorted(names))}.")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data, "").validate()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE.", "Write e.g. --set training.lr=5e-5.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key.", "Write e.g. --set training.lr=5e-5.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a config dict."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config section {'.'.join(parts[: i + 1])} in override {text!r}.",
                                  "Sections: model, prompts, reward, training, logging.")
            node = node[part]
        if parts[-1] not in node:
            where = ".".join(parts[:-1]) or "(top level)"
            raise ConfigError(f"unknown config key {'.'.join(parts)}.", f"Valid keys in {where}: {', '.join(sorted(node))}.")
        node[parts[-1]] = value
    return data


def presets_dir():
    return resources.files("mvz.train").joinpath("presets")


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in presets_dir().iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"config {where} is not valid YAML ({first}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {where} must be a YAML mapping of sections.")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    path = presets_dir().joinpath(f"{name}.yaml")
    if not path.is_file():
        raise ConfigError(f"unknown training preset {name!r}.", f"Use one of {', '.join(available_presets())}.")
    data = _read_yaml(path.read_text(encoding="utf-8"), f"preset {name}")
    data.setdefault("preset", name)
    return data


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML file <- ``--set`` overrides, type-checked."""
    data = dataclasses.asdict(TrainConfig())
    if preset:
        data = deep_merge(data, preset_dict(preset))
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist.", "Pass an existing YAML file to --config.")
        data = deep_merge(data, _read_yaml(path.read_text(encoding="utf-8"), str(path)))
    # type-check the merged file layer first so unknown keys in files are reported as such
    _build(TrainConfig, data, "")
    data = apply_overrides(data, overrides or [])
    return from_dict(data)


def config_from_yaml_text(text: str, where: str) -> TrainConfig:
    data = deep_merge(dataclasses.asdict(TrainConfig()), _read_yaml(text, where))
    return from_dict(data)
