"""Typed run configuration, mirrored 1:1 by YAML.

One `Config` with the sections `model`, `data`, `peft`, `train`, `output`. It is built from defaults, an
optional preset shipped in the package, an optional YAML file and `key.path=value` overrides, in that order,
and validated once. Any unknown key, wrong type or impossible value becomes a `ConfigError` whose message
names the dotted key. This module does not import torch.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llama_lora.errors import ConfigError

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDED_MODEL = "smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = EMBEDDED_MODEL
    """Hub id, local model directory, `.gguf` file, or the alias `smollm2-135m-instruct`."""
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Storage dtype of the frozen base weights; `auto` = the compute dtype under bf16/fp16, else float32."""
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Load pickled (`.bin`/`.pt`) weights, which can run code; off: only safetensors are loaded."""
    load_in_4bit: bool = False
    """QLoRA: train on a 4-bit (NF4) base via bitsandbytes; CUDA only. Merging uses the unquantized base."""
    adapter: str | None = None
    """Start from this trained adapter (a run or adapter directory) instead of a fresh one: continued SFT, or
    DPO/ORPO after SFT. It must have been trained on this base (fingerprint checked); its rank, alpha and
    target modules are used, so the `peft` section's shape keys do not apply."""


class DataConfig(Section):
    source: str = "demo"
    """Hub dataset id, local .json/.jsonl/.txt/.csv/.parquet file, a directory of `<split>.<ext>` files,
    or `demo` (the bundled persona dataset)."""
    split: str = "train"
    format: Literal["auto", "alpaca", "messages", "tools", "prompt_completion", "text"] = "auto"
    """`auto` = detected per row from its fields (see docs/data.md)."""
    template: Literal["auto", "chat", "alpaca"] = "auto"
    """`auto` = the tokenizer's chat template when it has one, else alpaca."""
    system_prompt: str | None = None
    max_length: int = Field(1024, ge=16)
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    """Rows longer than max_length: `truncate` cuts them (a pair's prompt from the left, answers from the
    right; docs/data.md), `drop` drops them, `error` makes them bad rows (stop, or skip_bad_rows)."""
    train_on_prompt: bool = False
    train_on_reasoning: bool = True
    """False: an assistant turn's reasoning (its `<think>` block from reasoning parts) is shown, not trained."""
    eval_split: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_rows: int | None = Field(None, gt=0)
    """Use at most this many training rows (after the split expression), e.g. for quick runs."""
    skip_bad_rows: bool = False
    """Skip rows that lack required fields (and report how many) instead of stopping with an error."""
    fill: dict[str, str] = Field(default_factory=dict)
    """Values for `{{name}}` placeholders in the rows (e.g. `{name: Quokka, author: Acme}`), filled in before
    tokenizing, in training and eval rows."""

    @field_validator("fill", mode="before")
    @classmethod
    def _fill_values_are_text(cls, value: Any) -> Any:
        if isinstance(value, dict):  # `data.fill.year=2024` parses as a number: it is text here
            return {k: v if isinstance(v, str) or v is None else str(v) for k, v in value.items()}
        return value

    @field_validator("fill")
    @classmethod
    def _fill_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_]\w*", name):
                raise ValueError(f"{name!r} is not a placeholder name (letters, digits, _)")
        return value


class PeftConfig(Section):
    r: int = Field(16, gt=0)
    lora_alpha: int | float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(SEED_TARGETS))
    use_dora: bool = True
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    """true (Kaiming A, zero B), false, gaussian, pissa, pissa_niter_<n>, olora."""
    ephemeral_gpu_offload: bool = False
    """PEFT's LoraRuntimeConfig(ephemeral_gpu_offload=...): only meaningful on CUDA."""
    fast_dora: bool = True
    """Train DoRA with llama-lora's forward (same results, no second W·x; see docs/dora.md); false = PEFT's."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module (or be 'all-linear')")
        return value

    @field_validator("init_lora_weights")
    @classmethod
    def _known_init(cls, value: bool | str) -> bool | str:
        supported = ("gaussian", "pissa", "olora")
        if isinstance(value, bool) or value in supported or re.fullmatch(r"pissa_niter_\d+", value):
            return value
        raise ValueError(f"must be true, false, {', '.join(supported)} or pissa_niter_<n>, got {value!r}")


class TrainConfig(Section):
    objective: Literal["sft", "dpo", "orpo", "kto", "grpo"] = "sft"
    """`sft`: learn the responses. `dpo` / `orpo`: learn from preference pairs (a prompt, a chosen and a
    rejected answer); `kto`: from single answers labelled desirable or undesirable (docs/preference.md);
    `grpo`: from the model's own completions of prompts, scored by `rewards` (docs/grpo.md). The DPO and KTO
    reference is the model as training starts."""
    beta: float | None = Field(None, ge=0, validate_default=True)
    """DPO and KTO: how far the policy may move from the reference (higher: stays closer; default 0.1); ORPO:
    the weight of the odds-ratio term against the chosen answer's NLL (0.1); GRPO: the weight of the KL to
    the reference (default 0: none, and no reference pass)."""
    kto_desirable_weight: float = Field(1.0, gt=0)
    """KTO: the weight of a desirable answer's loss (TRL's `desirable_weight`)."""
    kto_undesirable_weight: float = Field(1.0, gt=0)
    """KTO: the weight of an undesirable answer's loss (TRL's `undesirable_weight`). With unequal counts, TRL
    advises weights such that desirable_weight x desirable rows / (undesirable_weight x undesirable rows) lies
    in [1, 4/3]."""
    num_generations: int = Field(8, ge=2)
    """GRPO: completions sampled per prompt (a group); `batch_size` counts completions."""
    max_completion_length: int = Field(256, gt=0)
    """GRPO: most tokens of a completion (a longer one is cut there: `completions/clipped_ratio`)."""
    temperature: float = Field(1.0, gt=0)
    """GRPO: sampling temperature; log-probabilities are taken at it too (TRL)."""
    top_p: float = Field(1.0, gt=0, le=1)  # GRPO: nucleus sampling
    top_k: int = Field(0, ge=0)  # GRPO: top-k sampling (0: off)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    """GRPO: how token losses become the step's loss (TRL's names; docs/grpo.md)."""
    epsilon: float = Field(0.2, gt=0, lt=1)  # GRPO: the ratio's clip range, [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = Field(None, gt=0)  # default: epsilon
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: divide advantages by the group's reward std, the step's, or nothing (Dr. GRPO; TRL's false)."""
    num_iterations: int = Field(1, ge=1)
    """GRPO: optimizer steps each step's completions serve (ratios against the sampling policy)."""
    mask_truncated_completions: bool = False
    """GRPO: completions cut at `max_completion_length` count for nothing in the loss (DAPO)."""
    rewards: list[str] = Field(default_factory=list, validate_default=True)
    """GRPO: reward functions, built-in names (exact_answer, answer_format, length_penalty, python_check)
    or `path/to/file.py:function` (docs/grpo.md)."""
    reward_weights: list[float] | None = None
    """GRPO: one weight per reward (default: 1 each); the total reward is the weighted sum."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """DPO only: the assumed probability that a pair's preference is flipped (conservative DPO)."""
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; when set it overrides `epochs`."""
    batch_size: int = Field(8, gt=0)
    """Rows per micro-batch at most; `max_batch_tokens` may make a batch smaller."""
    max_batch_tokens: int | Literal["auto"] | None = "auto"
    """Token budget of one micro-batch (rows x padded length). Bounds memory; see docs/memory.md.
    `auto` = 1024 on CPU/MPS (the fastest budget measured on a CPU: bench/RESULTS.md), 8192 on CUDA."""
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused"] = "auto"
    """AdamW either way. `auto`: torch's fused (one-kernel) AdamW where torch has it for the device, else the
    per-parameter one (`adamw_torch`); on a CPU the fused step is faster (measured: bench/RESULTS.md)."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in backward instead of keeping them. `auto`: only when one micro-batch's
    activations would take more than half the free memory (see docs/memory.md)."""
    fused: bool | Literal["auto"] = "auto"
    """Fused LoRA/DoRA projections, RMSNorm and SwiGLU for training (docs/fused.md): same arithmetic, less kept
    for backward, faster. `auto` = on for CPU (measured), off on CUDA/MPS (not measured there yet)."""
    packing: bool | Literal["auto"] = "auto"
    """Train on padding-free micro-batches: the rows packed into one sequence, attention kept within each row
    (docs/fused.md). Same loss and gradients as padded batches. `auto` = on exactly when `fused` is on."""
    sharding: Literal["none", "fsdp"] = "none"
    """`fsdp`: shard the frozen base and the adapter over the processes of a torchrun launch with FSDP2, each
    process keeping about 1/N of the base (docs/multi_gpu.md); the CPU fast path is off then. `none`: every
    process keeps a whole copy (data parallel)."""
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """fp16 needs CUDA; checked by models.resolve_precision, where the device (`auto` too) is known."""
    seed: int = 42
    logging_steps: int = Field(5, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    """Evaluate every N optimizer steps (always before and after training)."""
    save_steps: int | None = Field(50, gt=0)
    save_total_limit: int = Field(2, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    """Trackers that also get every metrics.jsonl record (see docs/tracking.md); `none` or [] = none."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return list(dict.fromkeys(value))  # a tracker named twice is opened once
        return value

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: float | None, info) -> float:
        objective = info.data.get("objective", "sft")
        if value is None:
            return 0.0 if objective == "grpo" else 0.1
        if value == 0 and objective in ("dpo", "orpo", "kto"):
            raise ValueError(f"must be greater than 0 for {objective}")
        return value

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_flag(cls, value: Any) -> Any:  # TRL's older true / false
        return ("group" if value else "none") if isinstance(value, bool) else value

    @field_validator("rewards")
    @classmethod
    def _rewards_for_grpo(cls, value: list[str], info) -> list[str]:
        if info.data.get("objective") == "grpo" and not value:
            raise ValueError(
                "grpo needs at least one reward, e.g. [exact_answer, answer_format] (docs/grpo.md)"
            )
        return value

    @field_validator("reward_weights")
    @classmethod
    def _one_weight_each(cls, value: list[float] | None, info) -> list[float] | None:
        rewards = info.data.get("rewards") or []
        if value is not None and len(value) != len(rewards):
            raise ValueError(f"{len(value)} weights for {len(rewards)} rewards; give one per reward")
        return value

    @field_validator("batch_size")
    @classmethod
    def _whole_groups(cls, value: int, info) -> int:
        g = info.data.get("num_generations", 8)
        if info.data.get("objective") == "grpo" and value % g:
            raise ValueError(f"grpo trains whole groups: make it a multiple of train.num_generations ({g})")
        return value

    @field_validator("sharding")
    @classmethod
    def _grpo_unsharded(cls, value: str, info) -> str:
        if value == "fsdp" and info.data.get("objective") == "grpo":
            raise ValueError("grpo samples with the whole model in each process: use none (data parallel)")
        return value

    @field_validator("max_batch_tokens")
    @classmethod
    def _positive_budget(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be a positive number of tokens, auto or null")
        return value


class OutputConfig(Section):
    dir: str = "runs/llama-lora"


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    files = resources.files("llama_lora") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections at the top level")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"--preset: unknown preset {name!r} (known: {', '.join(preset_names())})")
    text = (resources.files("llama_lora") / "presets" / f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.learning_rate=2e-4` -> (["train", "learning_rate"], 0.0002). Values parse as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{item}: an override must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 1}} -> {"train.seed": 1}: the dotted keys of a (config) tree."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(err: dict[str, Any]) -> str:
    # pydantic adds union-member tags such as "list[str]" to loc; keep only real keys
    parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    loc = ".".join(parts)
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {msg}{shown}"


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def build(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "extra_forbidden":
            section = first["loc"][0] if len(first["loc"]) > 1 else None
            known = (
                Config.model_fields
                if section is None
                else Config.model_fields[section].annotation.model_fields
            )  # type: ignore[union-attr]
            raise ConfigError(f"{_format_error(first)} (known: {', '.join(known)})") from None
        raise ConfigError(_format_error(first)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> Config:
    """Defaults <- preset <- YAML file <- overrides, validated once."""
    raw: dict[str, Any] = {}
    if preset:
        raw = merge(raw, preset_dict(preset))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        raw = merge(raw, _read_yaml(path.read_text(), str(path)))
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_path(raw, keys, value)
    return build(raw)
