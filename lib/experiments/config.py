"""One path from a notebook's ``parameters`` cell to its typed configuration.

Every notebook has one dataclass (``BaselinesConfig``, ``FSStudyConfig``,
``GradientMatchingConfig``) whose fields *are* its papermill parameters. The notebook ends its
setup with::

    config = notebook_config(GradientMatchingConfig, globals())

which reads exactly the dataclass's fields from the notebook's namespace, so a parameter name is
written twice (dataclass and ``parameters`` cell) and a test checks the two agree. Values given on
the command line as JSON strings (``-p tasks '["cr", "mpqa"]'``) are parsed; lists become tuples
where the field is a tuple. ``runtime`` then makes the run deterministic.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import json
import os
import random
import types
import typing
from pathlib import Path
from typing import Any, Collection, Mapping, TypeVar

import numpy as np
import torch

from ..paths import REPO_ROOT

C = TypeVar("C")

SCALES = ("small", "paper")


def _sequence_type(annotation: Any) -> type | None:
    """``tuple`` or ``list`` when a field holds one (bare, parametrised or optional), else None."""
    if isinstance(annotation, str):  # an annotation that could not be resolved
        return next((t for t in (tuple, list) if annotation.startswith(t.__name__)), None)
    if annotation in (tuple, list):  # bare `list`: typing.get_origin gives None for it
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return origin
    if origin in (typing.Union, types.UnionType):  # `tuple[str, ...] | None`
        kinds = {_sequence_type(a) for a in typing.get_args(annotation)} - {None}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` as the field's type: JSON strings for list-like fields, lists to tuples."""
    kind = _sequence_type(annotation)
    if kind is None or value is None:
        return value
    given = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                value = None  # reported below
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"parameter {name!r}: {given!r} is not a list. From the command line pass JSON, "
            f"e.g. -p {name} '[\"a\", \"b\"]', or use papermill's -y with YAML."
        )
    return tuple(value) if kind is tuple else value


def notebook_config(config_class: type[C], namespace: Mapping[str, Any]) -> C:
    """The config whose fields are read from ``namespace`` (a notebook's ``globals()``).

    Fields missing from the namespace keep their defaults; a ``scale`` other than
    ``small``/``paper`` is an error naming the choices.
    """
    hints = typing.get_type_hints(config_class) if not isinstance(config_class, str) else {}
    values = {}
    for f in dataclasses.fields(config_class):
        if f.name in namespace:
            values[f.name] = _coerce(namespace[f.name], hints.get(f.name, f.type), f.name)
    scale = values.get("scale")
    if scale is not None and scale not in SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {SCALES}.")
    return config_class(**values)


def parameters_of(config) -> dict:
    """The config as JSON-able notebook parameters (tuples as lists), for ``run.json``."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def notebook_defaults(path) -> dict:
    """The default values of a notebook's ``parameters`` cell."""
    import papermill

    return {name: ast.literal_eval(spec["default"]) for name, spec in papermill.inspect_notebook(str(path)).items()}


def runtime(seed: int, threads: int | None = 2) -> None:
    """Make a run repeatable on one machine: seed every generator, fix the thread count (the
    order of float reductions depends on it) and ask torch for deterministic kernels.

    What this cannot fix is a different CPU: its BLAS picks other kernels (AVX2 vs AVX-512,
    other blockings) whose float rounding differs, so results across machines agree only within
    the spread measured over seeds (README, "What reproduces").
    """
    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# Parameters that say where things are or how a run looks, not what it computes.
_LOCATION_PARAMETERS = ("data_dir", "models_dir", "output_dir", "progress")


def settings_for(target: type[C], source, exclude: Collection[str] = (), **overrides) -> C:
    """A ``target`` config holding ``source``'s value for every field the two share by name
    (except ``exclude``), then ``overrides``. Notebooks 00, 02 and 05 build notebook 01's
    config this way: same-named settings mean the same thing in both, so the experts that
    notebook 01 trained and cached are found again."""
    shared = {f.name: getattr(source, f.name) for f in dataclasses.fields(target)
              if hasattr(source, f.name) and f.name not in exclude}
    return target(**{**shared, **overrides})


def take_unchanged(config, profile: Mapping[str, Any]) -> None:
    """Set ``profile``'s values on the fields of ``config`` left at their defaults (a profile such
    as the paper scale or an earlier benchmark design; the settings a caller changed are kept).
    Names ``config`` does not have are skipped, so notebooks can share one profile. Fields with a
    ``default_factory`` (lists) compare against a fresh default and get their own copy of the value."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, value in profile.items():
        f = fields.get(name)
        if f is None:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(config, name) == default:
            setattr(config, name, copy.deepcopy(value))


def output_folder(notebook: str, config) -> Path:
    """Where a notebook run writes its tables and figures.

    - ``config.output_dir`` when given (a relative path is taken from the repository root);
    - ``figures/<notebook>/``, the committed results, only for the default configuration;
    - otherwise ``runs/<notebook>/<the changed parameters>``, so that a custom run (other tasks,
      budgets, seeds) never overwrites the committed results. Pass
      ``output_dir=figures/<notebook>`` to do that on purpose.
    """
    if config.output_dir:
        path = Path(config.output_dir).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path
    defaults = type(config)()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name not in _LOCATION_PARAMETERS and getattr(config, f.name) != getattr(defaults, f.name)}
    if not changed:
        return REPO_ROOT / "figures" / notebook
    described = "_".join(f"{k}={_short(v)}" for k, v in changed.items())
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return REPO_ROOT / "runs" / notebook / f"{described[:80]}-{digest}"


def _short(value) -> str:
    """A parameter value as a short, file-name-safe string (paths by their last part)."""
    if isinstance(value, (list, tuple)):
        return "+".join(_short(v) for v in value)
    text = Path(str(value)).name if os.sep in str(value) or "/" in str(value) else str(value)
    return "".join(c if c.isalnum() or c in "-.=" else "-" for c in text)
