"""Experiment configuration: frozen dataclasses built from YAML through one loader.

Load order: YAML file (following ``extends:``) -> dotted CLI overrides (``model.n_layer=4``) -> type conversion
-> dataclasses -> validation. Every mistake raises :class:`ConfigError` naming the dotted key, the bad value and
what is allowed. The defaults are the ``tiny`` preset.

The top level holds the ``lm`` sections below plus the sections ``lmplatform`` reads (``ray``, ``tracking``);
``tune`` and ``serve`` are refused until their issues (#11, #12) add them, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

BUILTIN_CORPORA = ("tinyshakespeare", "shakespeare-complete")
# Sections that lmplatform validates; the lm loader tolerates them so one YAML serves both.
PLATFORM_SECTIONS = frozenset({"ray", "tracking", "tune", "search", "serve"})
# Sections the design names whose code has not landed: refused, so a YAML never looks like it configured them.
UNSUPPORTED_SECTIONS: dict[str, int] = {}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


def _choices(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError ``key=value is not allowed: allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_name(value: str, key: str) -> None:
    """Raise ConfigError unless ``value`` is a safe run/experiment name: it becomes a directory name."""
    check(
        isinstance(value, str) and _NAME.fullmatch(value) is not None and value not in (".", ".."),
        key,
        value,
        "1-100 characters from letters, digits, '.', '_' and '-', starting with a letter or digit "
        "(it names a directory)",
    )


class Section:
    """Mixin: each section knows its YAML name and validates itself on construction."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            if allowed is not None:
                check(value in allowed, self._key(f.name), value, f"one of {', '.join(allowed)}")
        self.validate()

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None:
                check(value > 0, self._key(name), value, "must be > 0")

    def validate(self) -> None:
        """Raise ConfigError if a value in this section is impossible."""


@dataclass(frozen=True)
class ModelConfig(Section):
    """Shape of the decoder-only transformer (defaults: the 658,944-parameter ``tiny`` preset)."""

    section: ClassVar[str] = "model"
    vocab_size: int = 2048
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    mlp_dim: int | None = None  # None means 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    attention: str = field(default="fused", metadata=_choices("fused", "explicit"))
    gradient_checkpointing: bool = False

    @property
    def mlp_hidden(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.n_embd // self.n_head

    def validate(self) -> None:
        self._positive("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_dim")
        check(
            self.n_embd % self.n_head == 0,
            "model.n_embd",
            self.n_embd,
            f"must be divisible by model.n_head={self.n_head}",
        )
        check(
            self.vocab_size >= 258,
            "model.vocab_size",
            self.vocab_size,
            "must be >= 258 (256 bytes + 2 specials)",
        )
        check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class TokenizerConfig(Section):
    """Byte-level BPE tokenizer: train one (vocab size from ``model.vocab_size``) or load ``path``."""

    section: ClassVar[str] = "tokenizer"
    path: str | None = field(default=None, metadata={"path": True})
    min_frequency: int = 2

    def validate(self) -> None:
        self._positive("min_frequency")


@dataclass(frozen=True)
class DataConfig(Section):
    """Which text to train on and where its token cache lives."""

    section: ClassVar[str] = "data"
    corpus: str = field(default="tinyshakespeare", metadata={"corpus": True})
    cache_dir: str = field(default="data", metadata={"path": True})
    val_fraction: float = 0.1  # the reported split: the end of the text (the standard tiny-shakespeare val)
    dev_fraction: float = 0.05  # the tuning split, held out of the training text (from its start)

    def validate(self) -> None:
        check(bool(self.corpus), "data.corpus", self.corpus, f"a file, a folder or one of {BUILTIN_CORPORA}")
        check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        check(0.0 < self.dev_fraction < 1.0, "data.dev_fraction", self.dev_fraction, "must be in (0, 1)")
        check(
            self.dev_fraction + self.val_fraction < 1.0,
            "data.dev_fraction",
            self.dev_fraction,
            f"data.dev_fraction + data.val_fraction (={self.val_fraction}) must be < 1, leaving text to train on",
        )


@dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW (or Muon on the hidden matrices) with decoupled weight decay, warmup then a learning-rate schedule."""

    section: ClassVar[str] = "optim"
    # adamw: AdamW over every parameter. muon: Muon (torch.optim.Muon's update) over the weight matrices inside the
    # blocks, AdamW over the embedding, the output head, LayerNorms and biases (lm.optim). Muon's learning rate is
    # lr * muon_lr_scale, its update scaled to an AdamW update's RMS; beta1/beta2/eps are AdamW's, muon_momentum
    # is Muon's.
    optimizer: str = field(default="adamw", metadata=_choices("adamw", "muon"))
    muon_lr_scale: float = 1.0
    muon_momentum: float = 0.95
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 50
    # After warmup: cosine or linear decay to min_lr over the budget, constant at lr, or wsd (warmup-stable-decay:
    # lr until the last decay_fraction of the budget, then linear to min_lr).
    schedule: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant", "wsd"))
    decay_fraction: float = 0.2  # wsd only: the final fraction of the budget that decays
    grad_clip: float | None = 1.0
    decay_embeddings: bool = False
    # An exponential moving average of the weights, updated after every step (0 = off). When on, evaluation,
    # checkpoints' model.safetensors, best/ and everything that loads them use the average; trainer.pt keeps the
    # training weights for resume. ema_decay caps the decay: 0.99 averages about the last 100 steps. Until the cap,
    # the average grows with the run and covers about the last ema_horizon of the steps so far (the decay after
    # step t is h(1 + t) / (1 + h(1 + t)) for h = ema_horizon): 0.1 reaches 0.99 at step 989; 1 weighs every
    # step's weights alike (the initial ones twice).
    ema_decay: float = 0.0
    ema_horizon: float = 0.1

    def unshardable(self) -> str | None:
        """What here sharded (FSDP) training cannot do, why, and which settings to change; None if nothing."""
        found = []  # (setting, why, the value that works)
        if self.ema_decay:
            found.append((f"optim.ema_decay={self.ema_decay}", "the weight average would need its own shards",
                          "optim.ema_decay=0"))  # fmt: skip
        if self.optimizer != "adamw":
            found.append((f"optim.optimizer={self.optimizer}", "Muon would orthogonalize each rank's shard of a "
                          "matrix instead of the whole matrix", "optim.optimizer=adamw"))  # fmt: skip
        if not found:
            return None
        what = ", ".join(f"{setting} ({why})" for setting, why, _ in found)
        return f"{what}: set {' '.join(fix for _, _, fix in found)}"

    def validate(self) -> None:
        self._positive("lr", "eps", "grad_clip", "muon_lr_scale")
        check(0.0 <= self.muon_momentum < 1.0, "optim.muon_momentum", self.muon_momentum, "must be in [0, 1)")
        check(
            0.0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]"
        )
        check(self.weight_decay >= 0.0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        check(
            0.0 <= self.ema_decay < 1.0,
            "optim.ema_decay",
            self.ema_decay,
            "must be in [0, 1) (0 = no weight average; 0.99 averages about the last 100 steps)",
        )
        check(
            0.0 < self.ema_horizon <= 1.0,
            "optim.ema_horizon",
            self.ema_horizon,
            "must be in (0, 1] (the fraction of the steps so far the weight average covers; 1 = all of them)",
        )
        check(
            0.0 < self.decay_fraction <= 1.0,
            "optim.decay_fraction",
            self.decay_fraction,
            "must be in (0, 1] (the final fraction of the budget over which wsd decays to optim.min_lr)",
        )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"optim.{name}", value, "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig(Section):
    """Batch, budget (steps, tokens or wall-clock seconds), evaluation, checkpoints and runtime options."""

    section: ClassVar[str] = "train"
    batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int | None = 2000
    max_tokens: int | None = None
    max_seconds: float | None = None
    eval_interval: int = 0  # steps between evaluations; 0 = only at the end
    # In-training evaluations score the dev split: None = all of it; N = its first N batches, the same for every
    # evaluation (the final one included), so every checkpoint competing for best sees the same tokens.
    eval_max_batches: int | None = None
    log_interval: int = 50
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    amp: str = field(default="auto", metadata=_choices("auto", "off", "bf16", "fp16"))
    compile: bool = False
    num_threads: int | None = None
    out_dir: str | None = field(default=None, metadata={"path": True})  # None: runs/<name>-local

    def validate(self) -> None:
        self._positive(
            "batch_size", "grad_accum_steps", "max_steps", "max_tokens", "max_seconds", "log_interval",
            "keep_last", "num_threads", "eval_max_batches",
        )  # fmt: skip
        for name in ("eval_interval", "checkpoint_interval"):
            check(
                getattr(self, name) >= 0,
                f"train.{name}",
                getattr(self, name),
                "must be >= 0 (0 = only at the end)",
            )
        check(
            any(v is not None for v in (self.max_steps, self.max_tokens, self.max_seconds)),
            "train.max_steps",
            None,
            "set at least one budget: train.max_steps, train.max_tokens or train.max_seconds",
        )
        check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "train.device",
            self.device,
            "auto, cpu, cuda, cuda:N or mps",
        )


@dataclass(frozen=True)
class SampleConfig(Section):
    """Defaults for text generation."""

    section: ClassVar[str] = "sample"
    prompt: str = "ROMEO:"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    num_samples: int = 1
    seed: int = 1

    def validate(self) -> None:
        self._positive("max_new_tokens", "top_k", "num_samples")
        check(self.temperature >= 0.0, "sample.temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if self.top_p is not None:
            check(0.0 < self.top_p <= 1.0, "sample.top_p", self.top_p, "must be in (0, 1]")


@dataclass(frozen=True)
class ExperimentConfig(Section):
    """One experiment: a section per concern."""

    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        check_name(self.name, "name")
        steps = self.train.max_steps
        if steps is not None:
            check(
                self.optim.warmup_steps <= steps,
                "optim.warmup_steps",
                self.optim.warmup_steps,
                f"must be <= train.max_steps={steps}",
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step on one process (micro-batch x accumulation x block)."""
        return self.train.batch_size * self.train.grad_accum_steps * self.model.block_size


# --------------------------------------------------------------------------------------------------------------
# Loading


def read_raw(
    path: str | Path | None, overrides: Iterable[str] = (), follow_extends: bool = True
) -> dict[str, Any]:
    """Read a YAML experiment (following ``extends:``) and apply dotted overrides; checks the top-level sections.

    With ``follow_extends=False`` a file holding ``extends:`` is an error: a checkpoint's ``config.yaml`` is
    complete by itself and must never pull in other files (which may not exist, or differ, on this machine).
    """
    raw: dict[str, Any] = _read_yaml_chain(Path(path), (), follow_extends) if path is not None else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value (e.g. model.n_layer=4)"
            )
        _set_dotted(raw, key.strip(), _parse_scalar(text))
    check_sections(raw)
    return raw


def check_sections(raw: Mapping[str, Any]) -> None:
    """Raise ConfigError for a top-level key that neither lm nor lmplatform reads (naming the allowed ones)."""
    allowed = [f.name for f in dataclasses.fields(ExperimentConfig) if f.init]
    for key in raw:
        if key in UNSUPPORTED_SECTIONS:
            raise ConfigError(
                f"section {key!r} is not supported yet: issue #{UNSUPPORTED_SECTIONS[key]} adds it; "
                f"remove the {key}: section (and any {key}.* override)"
            )
        if key not in allowed and key not in PLATFORM_SECTIONS:
            raise ConfigError(
                f"unknown key {str(key)!r}{_suggest(str(key), allowed + sorted(PLATFORM_SECTIONS), '')} "
                f"(allowed: {', '.join(allowed)}; and for lmplatform: {', '.join(sorted(PLATFORM_SECTIONS))})"
            )


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base_dir: str | Path | None = None,
    follow_extends: bool = True,
) -> ExperimentConfig:
    """Load an experiment from YAML plus dotted overrides; relative paths resolve against ``base_dir`` (cwd).

    Checkpoints load their saved ``config.yaml`` with ``follow_extends=False``.
    """
    raw = read_raw(path, overrides, follow_extends)
    lm_part = {k: v for k, v in raw.items() if k not in PLATFORM_SECTIONS}
    cfg = build(ExperimentConfig, lm_part)
    return resolve_paths(cfg, Path(base_dir) if base_dir is not None else Path.cwd())


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a plain mapping, converting types; errors name the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"unknown key {dotted!r}{_suggest(str(key), list(fields), prefix)} (allowed: {', '.join(fields)})"
            )
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def default_out_dir(name: str) -> str:
    """The in-process loop's run directory when ``train.out_dir`` is not set (relative to the base directory).

    ``-local`` keeps it apart from the Ray launcher's ``ray.storage_path/ray.run_name`` (``runs/<name>``).
    """
    return f"runs/{name}-local"


def resolve_paths(cfg: Any, base: Path) -> Any:
    """Return ``cfg`` with every path-like field made absolute against ``base`` (Ray workers change directory).

    On an :class:`ExperimentConfig`, an unset ``train.out_dir`` becomes ``<base>/runs/<name>-local``.
    """
    if isinstance(cfg, ExperimentConfig) and cfg.train.out_dir is None:
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, out_dir=default_out_dir(cfg.name))
        )
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = resolve_paths(value, base)
        elif isinstance(value, str) and f.metadata.get("path"):
            changes[f.name] = str((base / value).resolve())
        elif isinstance(value, str) and f.metadata.get("corpus") and value not in BUILTIN_CORPORA:
            changes[f.name] = str((base / value).resolve())
    return dataclasses.replace(cfg, **changes) if changes else cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (what YAML and MLflow params are made from)."""
    return dataclasses.asdict(cfg)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: {'model': {'n_layer': 2}} -> {'model.n_layer': 2}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML; ``load_config`` on it gives an equal config."""
    Path(path).write_text(dump_config(cfg))


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Apply dotted overrides to an existing config (used by sweeps and tests)."""
    raw = to_dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(raw, key.strip(), _parse_scalar(text))
    check_sections(raw)
    return build(ExperimentConfig, raw)


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _read_yaml_chain(path: Path, seen: tuple[Path, ...], follow_extends: bool = True) -> dict[str, Any]:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"extends: cycle in config files: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}"
        )
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not follow_extends:
        raise ConfigError(
            f"config file {str(path)!r} has extends: {parent!r}, which is not followed here: a checkpoint's "
            "config.yaml must be complete by itself"
        )
    if not isinstance(parent, str):
        raise ConfigError(f"extends={parent!r} in {str(path)!r} must be a file name")
    base = _read_yaml_chain(path.parent / parent, (*seen, resolved))
    return _merge(base, data)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: what`` from a PyYAML error, without its ``<unicode string>`` stream name."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        context = f"{context} started at line {context_mark.line + 1}, column {context_mark.column + 1}"
    what = ", ".join(p for p in (context, getattr(exc, "problem", None)) if p) or type(exc).__name__
    return f"{where}: {what}"


def _suggest(key: str, names: Sequence[str], prefix: str) -> str:
    """``; did you mean 'section.key'?`` for an unknown key: the closest name in its section, else a field of
    that name (or close to it) in another section, always as the full dotted key."""
    close = difflib.get_close_matches(key, list(names), n=1)
    if close:
        return f"; did you mean {(f'{prefix}.{close[0]}' if prefix else close[0])!r}?"
    if prefix and prefix not in _section_fields():
        return ""  # a section lm does not own (ray, tracking): only its own keys are candidates
    leaves = {k: s for s, fields in _section_fields().items() if s != prefix for k in fields}
    match = key if key in leaves else next(iter(difflib.get_close_matches(key, list(leaves), n=1)), None)
    return f"; did you mean {f'{leaves[match]}.{match}'!r}?" if match else ""


def _section_fields() -> dict[str, list[str]]:
    """Field names of each lm section of an experiment: {'model': ['vocab_size', ...], ...}."""
    hints = typing.get_type_hints(ExperimentConfig)
    return {
        f.name: [g.name for g in dataclasses.fields(hints[f.name]) if g.init]
        for f in dataclasses.fields(ExperimentConfig)
        if dataclasses.is_dataclass(hints[f.name])
    }


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if value is None:
        raise ConfigError(f"{key} must not be empty (expected {getattr(hint, '__name__', hint)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(value).strip().lower()]
        raise ConfigError(f"{key}={value!r} is not a boolean (true or false)")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not an integer")
        if isinstance(value, int):
            return value
        number = _as_float(value)
        if number is None or not number.is_integer():
            raise ConfigError(f"{key}={value!r} is not an integer")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a number")
        number = _as_float(value)
        if number is None:
            raise ConfigError(f"{key}={value!r} is not a number")
        return number
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans: `amp: off` means "off"
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {hint!r}")  # pragma: no cover


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())  # PyYAML reads 1e-3 (no dot) as a string
        except ValueError:
            return None
    return None
