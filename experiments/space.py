"""The search space of the ``search`` study: a YAML file of config fields and distributions.

A space file maps each searched field, dotted as ``--set`` takes it, to one distribution::

    optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    optim.batch_size: {type: int, low: 16, high: 64, step: 16}
    model.arch: {type: categorical, choices: [basic_cnn, resnet18]}
    unfreeze.activate_at: {type: categorical, choices: [[2, 4], [3, 6]]}

``float`` and ``int`` take ``low`` < ``high`` and optionally ``log`` (``low`` > 0) or ``step``
(not both); ``categorical`` takes a non-empty list of distinct ``choices``. A choice that is a
list or mapping is searched as its YAML text (Optuna's choices are scalars), and that text is
what the trial's ``--set`` gets.

Every field is checked up front by resolving the training configuration with the low and high
value, or each choice: an unknown field or a value the field refuses is one line naming the
file, the key and the allowed form, before any trial runs.

Public API:
    Param, SpaceError, read_space, override, FORMS.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od
import yaml

#: the allowed form of each distribution type, for the error lines.
FORMS = {
    "float": "{type: float, low: A, high: B[, log: true | step: S]} with A < B",
    "int": "{type: int, low: A, high: B[, log: true | step: S]} with integers A < B",
    "categorical": "{type: categorical, choices: [X, Y, ...]} with distinct choices",
}
_ANY_FORM = "; ".join(FORMS.values())
_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}}
_KEYS["categorical"] = {"choices"}


class SpaceError(ValueError):
    """A space file that cannot be used; the message is one line naming the file and key."""


@dataclass(frozen=True)
class Param:
    """One searched field: its dotted name and the Optuna distribution it is drawn from."""

    name: str
    distribution: od.BaseDistribution

    def record(self) -> dict[str, Any]:
        """JSON-plain form (kept in study.json, so an edited space is a different command)."""
        return {"name": self.name, "distribution": od.distribution_to_json(self.distribution)}

    def samples(self) -> list[Any]:
        """Values that span the distribution, for checking the field before any trial."""
        d = self.distribution
        if isinstance(d, od.CategoricalDistribution):
            return list(d.choices)
        return [d.low, d.high]


def override(name: str, value: Any) -> str:
    """The ``--set`` text for ``name`` at ``value`` (a categorical list choice is already YAML)."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        # repr keeps every digit; "1e-05" has no dot, which YAML 1.1 reads as a string, but the
        # config's float fields take such strings (training.config.schema._to_float).
        text = repr(value)
    else:
        text = str(value)
    return f"{name}={text}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice_value(choice: Any) -> Any:
    if isinstance(choice, (list, dict)):
        # flow style: one line, the form --set reads ("[2, 4]")
        return yaml.safe_dump(choice, default_flow_style=True).strip()
    return choice


def _distribution(key: str, spec: Any, fail: Callable[[str], SpaceError]) -> od.BaseDistribution:
    if not isinstance(spec, Mapping) or spec.get("type") not in FORMS:
        raise fail(f"needs a mapping with type float, int or categorical; allowed: {_ANY_FORM}")
    kind = spec["type"]
    form = FORMS[kind]
    extra = sorted(set(spec) - _KEYS[kind] - {"type"})
    if extra:
        raise fail(f"unknown entry {', '.join(extra)} for type {kind}; allowed: {form}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"choices must be a non-empty list; allowed: {form}")
        values = [_choice_value(c) for c in choices]
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise fail(f"a choice is given twice; allowed: {form}")
        return od.CategoricalDistribution(values)
    low, high = spec.get("low"), spec.get("high")
    log, step = spec.get("log", False), spec.get("step")
    want_int = kind == "int"
    for label, value in (("low", low), ("high", high), ("step", step)):
        if value is None and label == "step":
            continue
        if not _is_number(value) or (want_int and not isinstance(value, int)):
            what = "an integer" if want_int else "a number"
            raise fail(f"{label}={value!r} is not {what}; allowed: {form}")
    if not low < high:
        raise fail(f"low={low!r} must be below high={high!r}; allowed: {form}")
    if not isinstance(log, bool):
        raise fail(f"log={log!r} must be true or false; allowed: {form}")
    if log and low <= 0:
        raise fail(f"log: true needs low > 0 (got {low!r}); allowed: {form}")
    if log and step is not None:
        raise fail(f"log and step cannot be combined; allowed: {form}")
    if step is not None and step <= 0:
        raise fail(f"step={step!r} must be > 0; allowed: {form}")
    if want_int:
        return od.IntDistribution(low, high, log=log, step=step or 1)
    return od.FloatDistribution(float(low), float(high), log=log, step=step)


def read_space(path: str | Path, check: Callable[[str], None] | None = None) -> list[Param]:
    """The searched fields of the space file ``path``, in the file's order.

    ``check`` receives each ``--set`` override the space can produce (low, high, every choice)
    and raises ``ValueError`` (the config's ``ConfigError``) with the reason when the training
    configuration refuses it.

    Raises:
        SpaceError: the file is missing or not YAML, is empty or not a mapping, a key is not a
            dotted field, a distribution is malformed, or the configuration refuses a value.
    """
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        reason = str(error).replace("\n", " ")
        raise SpaceError(f"space file {path}: cannot be read as YAML ({reason})") from None
    if not isinstance(tree, Mapping) or not tree:
        raise SpaceError(
            f"space file {path}: needs a mapping of config fields to distributions, e.g. "
            "optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}"
        )
    params = []
    for key, spec in tree.items():

        def fail(message: str, key: Any = key) -> SpaceError:
            return SpaceError(f"space file {path}: {key}: {message}")

        if not isinstance(key, str) or key.count(".") != 1:
            raise fail("is not a config field; give section.field as --set takes it (optim.lr)")
        param = Param(key, _distribution(key, spec, fail))
        if check is not None:
            for value in param.samples():
                try:
                    check(override(key, value))
                except ValueError as error:
                    raise fail(f"the config refuses {value!r}: {error}") from None
        params.append(param)
    return params
