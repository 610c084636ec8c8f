"""Typed training configs (pydantic models), YAML files, dotted overrides (``--set training.lr=5e-5``).

Unknown keys and wrong types are :class:`~mvz.errors.ConfigError`\\ s naming the key (one line, exit 2 in the
CLI). Key names follow the upstream MVC-ZigAL Hydra configs (``mvczigal.md`` §9) where they exist there; an
upstream config file itself is read by :mod:`mvz.train.upstream`.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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



class _Section(BaseModel):
    # extra keys are errors; nan/inf would pass every range check and poison the run
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


class ModelConfig(_Section):
    name: str = "sdxl-lcm"  # a model preset (tiny, sdxl-lcm) or an assembled model folder
    random_weights: bool = False
    base_model: str | None = None
    unet_model: str | None = None
    vae_model: str | None = None
    adapter: str | None = None


class PromptConfig(_Section):
    prompt_set: str = "simple_animals"  # a shipped set (simple_animals) or a prompt file path


class RewardConfig(_Section):
    reward_fn: str = "pickscore"  # per-view reward R: a registry name, or module:callable / file.py:callable
    mv_reward_fn: str = "hyperscore"  # joint (6-view set) reward R_mv: its per_set output (HyperScore overall)
    preset: str | None = None  # "tiny": random tiny reward weights (tests, CI)
    reward_checkpoint: str | None = None
    mv_reward_checkpoint: str | None = None
    dtype: str = "fp32"  # upstream scores in fp32


class TrainingConfig(_Section):
    method: Literal["mvczigal", "mv_zigal", "ws_zigal", "mv_rdl", "mv_pg"] = "mvczigal"
    objective: Literal["constrained", "weighted", "joint", "per_view"] | None = None  # null: the method's default
    # generation
    resolution: int = Field(768, ge=1)
    num_views: int = Field(6, ge=1)
    num_inference_steps: int = Field(8, ge=1, le=50)
    guidance_scale: float = 7.0
    inv_guidance_scale: float = 1.0  # ZMV zag guidance (w = 0)
    zmv_steps: int = Field(1, ge=0)  # ZMV lambda_step
    zmv_repeats: int = Field(1, ge=1)  # ZMV T_max
    train_last_step: bool = True  # upstream trains the last (reward-irrelevant) noisy action too
    # batch arithmetic
    sample_batch_size_per_gpu: int = Field(4, ge=1)
    num_sample_iters: int = Field(1, ge=1)
    batches_per_epoch: int = Field(10, ge=1)
    num_epochs: int = Field(70, ge=1)
    train_batch_size_per_gpu: Literal[1] = 1  # one prompt pair per micro-step, as upstream
    num_inner_epochs: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(32, ge=1)
    # optimiser
    lr: float = Field(1e-4, gt=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_grad_norm: float = Field(5.0, gt=0)
    clip_range: float = Field(1e-4, gt=0)
    adv_clip_max: float = 10.0  # used by mv_pg only (upstream: unused)
    # LoRA
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float | None = None  # null: = rank (scale 1)
    lora_scale: float = 1.0
    # constraint (Lagrangian)
    lambda_init: float = Field(0.0, ge=0)
    lambda_lr: float = Field(0.1, ge=0)
    lambda_max: float | None = Field(5.0, ge=0)  # 0 or null: no upper cap (upstream: ``lambda_max if lambda_max else None``)
    lambda_update_delay_steps: int = Field(0, ge=0)
    ema_beta: float = Field(0.99, ge=0, le=1)
    constrain_threshold_init: float = 0.0
    ws_weight: float = Field(0.5, ge=0)  # WS-ZigAL fixed weight w
    # precision / memory
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"  # frozen weights in this dtype, LoRA in fp32
    allow_tf32: bool = True
    gradient_checkpointing: bool = True
    vae_batch: int = Field(6, ge=1)  # decode at most this many views at once (VAE slicing)
    split_pair_forward: bool = False  # true: one UNet call per trajectory (lower peak memory) instead of one per pair
    # bookkeeping
    seed: int = Field(42, ge=0, le=2**32 - 1)  # what numpy/accelerate's set_seed accept
    save_interval: int = Field(1, ge=1)


class LoggingConfig(_Section):
    sample_prompts: list[str] = Field(default_factory=list)  # empty: the first 2 prompts of the set
    sample_seed: int = Field(0, ge=0)
    sample_grid: bool = True
    tensorboard: bool = True  # --log-with tensorboard|wandb|all|none sets these two
    wandb: bool = False
    wandb_project: str = "mvczigal"
    kl_to_base: bool = True  # one extra no-grad UNet call per iteration for the KL-to-base curve


class TrainConfig(_Section):
    preset: str = "custom"
    model: ModelConfig = Field(default_factory=ModelConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

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

    @property
    def trained_steps(self) -> int:
        s = self.training.num_inference_steps
        return s if self.training.train_last_step or s == 1 else s - 1

    @property
    def micro_steps_per_iteration(self) -> int:
        t = self.training
        return t.sample_batch_size_per_gpu * t.num_sample_iters * self.trained_steps * t.num_inner_epochs

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, ignore: tuple[str, ...] = ()) -> str:
        flat = {k: v for k, v in flatten(self.to_dict()).items() if k not in ignore}
        return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> TrainConfig:  # noqa: D102  (checked on construction; kept for callers)
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        """What no single field can say (ConfigError passes through pydantic unchanged)."""
        t = self.training
        if t.num_inference_steps == 1 and not t.train_last_step:
            raise ConfigError("with 1 inference step, training.train_last_step=false leaves nothing to train.")
        if t.lambda_max and t.lambda_init > t.lambda_max:
            raise ConfigError(f"training.lambda_init {t.lambda_init} exceeds training.lambda_max {t.lambda_max}.")
        if not self.prompts.prompt_set.strip():
            raise ConfigError("prompts.prompt_set is empty.", "Name a shipped set (simple_animals) or a prompt file.")
        micro, ga = self.micro_steps_per_iteration, t.gradient_accumulation_steps
        if micro % ga:  # accelerate syncs every ga micro-steps: a remainder would spill into the next iteration
            fits = [d for d in range(1, micro + 1) if micro % d == 0]
            raise ConfigError(
                f"training.gradient_accumulation_steps {ga} does not divide the {micro} micro-steps of an iteration "
                f"(sample_batch_size_per_gpu {t.sample_batch_size_per_gpu} x num_sample_iters {t.num_sample_iters} x "
                f"{self.trained_steps} trained steps x num_inner_epochs {t.num_inner_epochs}).",
                f"Use one of {', '.join(map(str, fits))}.")
        return self


# ---- validation errors as one line --------------------------------------------------------------------

def _section_of(loc: tuple) -> type[BaseModel] | None:
    cls: Any = TrainConfig
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        cls = field.annotation
    return cls


def config_error(exc: ValidationError) -> ConfigError:
    """The first pydantic error as one line naming the key."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _section_of(loc[:-1])
        valid = f"Valid keys{' in ' + '.'.join(map(str, loc[:-1])) if loc[:-1] else ''}: " + \
            ", ".join(sorted(section.model_fields)) + "." if section else "Check the key's spelling."
        return ConfigError(f"unknown config key {key}.", valid)
    msg = err["msg"][0].lower() + err["msg"][1:]
    return ConfigError(f"config key {key}: {msg}, got {err.get('input')!r}.",
                       "Fix the value in the YAML file or the --set override.")


def from_dict(data: dict[str, Any]) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of sections.")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc) from None


def defaults_dict() -> dict[str, Any]:
    return TrainConfig().to_dict()


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


def read_config_file(path: str | Path, notes: list[str] | None = None) -> dict[str, Any]:
    """A YAML config file as a dict in mvz's layout; upstream MVC-ZigAL's own files are mapped key by key
    (:mod:`mvz.train.upstream`, one note per ignored key)."""
    from mvz.train.upstream import is_upstream, map_upstream

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist.", "Pass an existing YAML file to --config.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (UTF-8 YAML) file.", "Pass a YAML config.") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path} is binary, not YAML.", "Pass a YAML config.")
    data = _read_yaml(text, str(path))
    return map_upstream(data, notes) if is_upstream(data) else data


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | None = None, notes: list[str] | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML file (mvz's or upstream's) <- ``--set`` overrides, type-checked."""
    data = defaults_dict()
    if preset:
        data = deep_merge(data, preset_dict(preset))
    if config_file:
        data = deep_merge(data, read_config_file(config_file, notes))
    data = apply_overrides(data, overrides or [])
    return from_dict(data)


def config_from_yaml_text(text: str, where: str) -> TrainConfig:
    data = deep_merge(defaults_dict(), _read_yaml(text, where))
    return from_dict(data)
