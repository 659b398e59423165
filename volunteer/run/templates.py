"""What a manifest may name, as tables: model templates, data generators, shard tasks and optimizers.

This module is the torch-free half of :mod:`volunteer.run.models` and :mod:`volunteer.run.data`: it knows
every name and the allowed keys and ranges of its config, so a manifest can be checked (and ``volunteer run
create`` can write one) without importing torch. Configs are flat maps of ``int``, ``float``, ``bool`` and
``str`` values; a resolved config holds every key of its table, defaults filled in, so the signed manifest
says exactly what is built and a later change of a default cannot change an existing run.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from volunteer.errors import ManifestError

ConfigValue = int | float | bool | str
"""A config entry: manifests are flat maps of these."""

Config = Mapping[str, ConfigValue]
"""A flat config map (read-only once resolved)."""


class Task(enum.StrEnum):
    """What a model learns from its data: they must agree."""

    CLASSIFICATION = "classification"
    """Feature vectors ``x`` (float) with class labels ``y``; data config ``input_dim`` and ``num_classes``."""
    LANGUAGE_MODEL = "language-model"
    """Token sequences, next-token prediction; data config ``vocab_size`` and ``seq_len`` (input positions)."""


@dataclass(frozen=True, slots=True)
class Param:
    """One allowed config key: its exact type, default and bounds."""

    kind: type
    """``int``, ``float``, ``bool`` or ``str``; checked exactly (``True`` is not an int, ``1`` not a float)."""
    default: ConfigValue
    """Used when the key is absent."""
    doc: str
    """One line for the user (written as a comment by ``volunteer run create``)."""
    minimum: float | None = None
    """Smallest allowed number (inclusive)."""
    maximum: float | None = None
    """Largest allowed number (inclusive)."""
    choices: tuple[str, ...] = ()
    """Allowed strings (empty: any string up to 64 characters)."""
    exclusive_minimum: bool = False
    """The minimum itself is not allowed (a learning rate of 0)."""

    def check(self, value: object, path: str, *, lenient: bool = False) -> ConfigValue:
        """Return ``value`` if it fits (an int for a float key becomes a float only when ``lenient``)."""
        if lenient and self.kind is float and type(value) is int:
            value = float(value)
        if type(value) is not self.kind:
            raise ManifestError(f"{path}: expected {self.kind.__name__}, got {type(value).__name__} {value!r:.40}")
        assert isinstance(value, int | float | bool | str)
        if isinstance(value, float) and not math.isfinite(value):
            raise ManifestError(f"{path}: {value} is not a finite number")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.minimum is not None and (
                value < self.minimum or (self.exclusive_minimum and value == self.minimum)
            ):
                relation = "above" if self.exclusive_minimum else "at least"
                raise ManifestError(f"{path}: {value} is out of range, it must be {relation} {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ManifestError(f"{path}: {value} is out of range, it must be at most {self.maximum}")
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                raise ManifestError(f"{path}: {value!r:.40} is not one of {', '.join(self.choices)}")
            if len(value) > 64:
                raise ManifestError(f"{path}: longer than 64 characters")
        return value


@dataclass(frozen=True, slots=True)
class ParamTable:
    """A named set of :class:`Param` with an optional cross-field check, e.g. one model template."""

    name: str
    """The name a manifest uses."""
    description: str
    """One line for the user."""
    params: Mapping[str, Param]
    """Allowed keys."""
    check: Callable[[Config], str | None] | None = None
    """Cross-field rule on the resolved config: returns a problem to report, or None."""
    task: Task | None = None
    """For model templates and data generators: the task they serve."""

    def defaults(self) -> dict[str, ConfigValue]:
        """Every key with its default."""
        return {key: param.default for key, param in self.params.items()}

    def resolve(self, config: Mapping[str, object], path: str, *, lenient: bool = False) -> Config:
        """Check ``config`` (unknown keys, types, ranges) and fill in defaults; a read-only, key-sorted map."""
        if not isinstance(config, Mapping):
            raise ManifestError(f"{path}: expected a table, got {type(config).__name__}")
        unknown = sorted(str(key) for key in config if key not in self.params)
        if unknown:
            allowed = ", ".join(self.params)
            raise ManifestError(f"{path}: unknown key(s) {', '.join(unknown)} for {self.name!r} (allowed: {allowed})")
        resolved: dict[str, ConfigValue] = {}
        for key in sorted(self.params):
            param = self.params[key]
            resolved[key] = (
                param.check(config[key], f"{path}.{key}", lenient=lenient) if key in config else param.default
            )
        if self.check is not None:
            problem = self.check(resolved)
            if problem:
                raise ManifestError(f"{path}: {problem}")
        return MappingProxyType(resolved)


def _lookup(tables: Mapping[str, ParamTable], name: str, what: str, path: str) -> ParamTable:
    try:
        return tables[name]
    except KeyError:
        known = ", ".join(sorted(tables))
        raise ManifestError(f"{path}: unknown {what} {name!r:.40}; known {what}s are: {known}") from None


# --- model templates ------------------------------------------------------------------------------------


def _check_tiny_lm(config: Config) -> str | None:
    d_model, n_heads = config["d_model"], config["n_heads"]
    assert isinstance(d_model, int)
    assert isinstance(n_heads, int)
    if d_model % n_heads:
        return f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})"
    return None


MODEL_TEMPLATES: Final[Mapping[str, ParamTable]] = MappingProxyType(
    {
        "mlp": ParamTable(
            name="mlp",
            description="A small MLP classifier: Linear+GELU hidden layers, then a linear head.",
            task=Task.CLASSIFICATION,
            params={
                "input_dim": Param(int, 64, "features per sample", 1, 65536),
                "hidden_dim": Param(int, 256, "width of each hidden layer", 1, 16384),
                "num_layers": Param(int, 2, "hidden layers", 0, 32),
                "num_classes": Param(int, 10, "output classes", 2, 100000),
            },
        ),
        "tiny-lm": ParamTable(
            name="tiny-lm",
            description="A tiny causal transformer language model (pre-norm, learned positions, tied embeddings).",
            task=Task.LANGUAGE_MODEL,
            params={
                "vocab_size": Param(int, 64, "tokens in the vocabulary", 2, 262144),
                "seq_len": Param(int, 64, "longest input sequence", 1, 8192),
                "d_model": Param(int, 64, "embedding width", 8, 8192),
                "n_heads": Param(int, 4, "attention heads (must divide d_model)", 1, 128),
                "n_layers": Param(int, 2, "transformer blocks", 1, 96),
                "d_ff": Param(int, 256, "hidden width of each feed-forward block", 8, 65536),
            },
            check=_check_tiny_lm,
        ),
    }
)
"""Built-in model templates by name (built by :func:`volunteer.run.models.build_model`)."""


def model_template(name: str, path: str = "model.template") -> ParamTable:
    """The template called ``name``; an unknown name raises :class:`ManifestError` listing the known ones."""
    return _lookup(MODEL_TEMPLATES, name, "model template", path)


# --- data: built-in generators and shard tasks ------------------------------------------------------------

DATA_GENERATORS: Final[Mapping[str, ParamTable]] = MappingProxyType(
    {
        "teacher": ParamTable(
            name="teacher",
            description="Classification: Gaussian inputs labelled by a random teacher network fixed by the run seed.",
            task=Task.CLASSIFICATION,
            params={
                "input_dim": Param(int, 64, "features per sample (= the model's input_dim)", 1, 65536),
                "num_classes": Param(int, 10, "classes (= the model's num_classes)", 2, 100000),
                "teacher_hidden": Param(int, 32, "hidden width of the teacher network", 1, 4096),
                "label_noise": Param(float, 0.0, "share of labels replaced by random ones", 0.0, 0.9),
            },
        ),
        "tokens": ParamTable(
            name="tokens",
            description="Language modelling on synthetic token sequences fixed by the run seed.",
            task=Task.LANGUAGE_MODEL,
            params={
                "vocab_size": Param(int, 32, "tokens used (at most the model's vocab_size)", 2, 262144),
                "seq_len": Param(int, 32, "input positions per sample (at most the model's seq_len)", 1, 8192),
                "task": Param(
                    str,
                    "markov",
                    "markov: a sparse random grammar (each token has a few likely successors); "
                    "copy: a random half-sequence, then the same again",
                    choices=("markov", "copy"),
                ),
                "branching": Param(int, 3, "successors per token in the markov grammar", 1, 64),
            },
        ),
    }
)
"""Built-in data generators by name (run by :mod:`volunteer.run.data`); they need nothing from outside."""

SHARD_TASKS: Final[Mapping[str, ParamTable]] = MappingProxyType(
    {
        Task.CLASSIFICATION.value: ParamTable(
            name=Task.CLASSIFICATION.value,
            description="Shards with a float tensor x [N, input_dim] and an integer tensor y [N].",
            task=Task.CLASSIFICATION,
            params={
                "input_dim": Param(int, 64, "features per sample", 1, 65536),
                "num_classes": Param(int, 10, "classes; every label is below this", 2, 100000),
            },
        ),
        Task.LANGUAGE_MODEL.value: ParamTable(
            name=Task.LANGUAGE_MODEL.value,
            description="Shards with an integer tensor tokens [N, seq_len + 1].",
            task=Task.LANGUAGE_MODEL,
            params={
                "vocab_size": Param(int, 64, "every token is below this", 2, 262144),
                "seq_len": Param(int, 64, "input positions per sample (rows hold seq_len + 1 tokens)", 1, 8192),
            },
        ),
    }
)
"""The tasks a sharded dataset may declare, with the dimensions its shards must have."""


def data_generator(name: str, path: str = "data.generator") -> ParamTable:
    """The built-in generator called ``name``; unknown names raise :class:`ManifestError`."""
    return _lookup(DATA_GENERATORS, name, "data generator", path)


def shard_task(name: str, path: str = "data.task") -> ParamTable:
    """The shard task called ``name``; unknown names raise :class:`ManifestError`."""
    return _lookup(SHARD_TASKS, name, "data task", path)


def check_data_fits_model(task: Task, data: Config, template: ParamTable, model: Config) -> None:
    """Raise :class:`ManifestError` unless data of ``task`` with dims ``data`` can train the model."""
    if template.task is not task:
        raise ManifestError(
            f"the data is for {task.value} but the model template {template.name!r} is for "
            f"{template.task.value if template.task else 'nothing'}; choose a matching data source"
        )
    if task is Task.CLASSIFICATION:
        for key in ("input_dim", "num_classes"):
            if data[key] != model[key]:
                raise ManifestError(f"data {key} ({data[key]}) differs from the model's {key} ({model[key]})")
    else:
        for key in ("vocab_size", "seq_len"):
            have, limit = data[key], model[key]
            assert isinstance(have, int)
            assert isinstance(limit, int)
            if have > limit:
                raise ManifestError(f"data {key} ({have}) exceeds the model's {key} ({limit})")


# --- optimizers and schedules -----------------------------------------------------------------------------


def _adam_like(lr: float, eps: float, weight_decay: float, doc: str) -> ParamTable:
    return ParamTable(
        name="",
        description=doc,
        params={
            "lr": Param(float, lr, "learning rate", 0.0, 10.0, exclusive_minimum=True),
            "beta1": Param(float, 0.9, "decay of the first moment", 0.0, 0.999999),
            "beta2": Param(float, 0.999, "decay of the second moment", 0.0, 0.999999),
            "eps": Param(float, eps, "added to the denominator", 0.0, 1.0, exclusive_minimum=True),
            "weight_decay": Param(float, weight_decay, "weight decay", 0.0, 1.0),
        },
    )


def _named(table: ParamTable, name: str) -> ParamTable:
    return ParamTable(name=name, description=table.description, params=table.params, check=table.check)


OPTIMIZERS: Final[Mapping[str, ParamTable]] = MappingProxyType(
    {
        "sgd": ParamTable(
            name="sgd",
            description="SGD with optional (Nesterov) momentum.",
            params={
                "lr": Param(float, 0.1, "learning rate", 0.0, 10.0, exclusive_minimum=True),
                "momentum": Param(float, 0.0, "momentum", 0.0, 0.999999),
                "nesterov": Param(bool, False, "Nesterov momentum (needs momentum > 0)"),
                "weight_decay": Param(float, 0.0, "L2 penalty", 0.0, 1.0),
            },
            check=lambda c: "nesterov needs momentum > 0" if c["nesterov"] and c["momentum"] == 0.0 else None,
        ),
        "adam": _named(_adam_like(1e-3, 1e-8, 0.0, "Adam (L2 penalty in the gradient)."), "adam"),
        "adamw": _named(_adam_like(1e-3, 1e-8, 0.01, "AdamW (decoupled weight decay)."), "adamw"),
        "lamb": _named(
            _adam_like(1e-3, 1e-6, 0.01, "LAMB: AdamW updates scaled per tensor by a trust ratio (large batches)."),
            "lamb",
        ),
    }
)
"""The optimizers a manifest may name, with their hyperparameters (nothing else is ever constructed)."""


def optimizer_table(name: str, path: str = "optimizer.name") -> ParamTable:
    """The optimizer called ``name``; unknown names raise :class:`ManifestError`."""
    return _lookup(OPTIMIZERS, name, "optimizer", path)


CODEC_NAMES: Final[tuple[str, ...]] = (
    "adaptive",
    "none",
    "fp16",
    "bf16",
    "scaled_fp16",
    "uniform8",
    "quantile8",
    "blockwise8",
)
"""Compression a manifest may ask for: ``adaptive`` (by tensor size and role, see
:mod:`volunteer.tensors.adaptive`) or one fixed codec of :class:`volunteer.tensors.codecs.CodecId`."""
