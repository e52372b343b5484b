"""The command line's view of a config dataclass, for tyro to parse, and the way back.

Most configs are their own command line. Two things need a view in between:

- a :class:`~vitscope.trainer.TrainConfig` holds its SAE family's settings as one typed object
  (``sae=TopKHyper(k=64)``); the command line spells that ``--variant topk --k 64``, with every
  registered family's settings as options (derived from the registry, so a family defined
  anywhere shows up), and a setting of another family is an error, not ignored;
- the pipeline's nested stage configs hide the fields the pipeline fills in itself.

:func:`view` builds the view class with a converter each way; the Python API and the Prefect
flows never see it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Annotated, Any, Literal

import tyro

if typing.TYPE_CHECKING:
    from vitscope.sae import Sae
    from vitscope.trainer import TrainConfig


@dataclass(frozen=True)
class View:
    """A dataclass for tyro (``cls``) and the conversions between it and the real config."""

    cls: type
    to_real: Callable[[Any], Any]
    to_view: Callable[[Any], Any]


def view(cls: type, hidden: Callable[[type], Collection[str]] = lambda c: ()) -> View:
    """The command line's view of the dataclass ``cls``; ``hidden(c)`` names the fields of a
    (nested) config class ``c`` that the command line does not show."""
    if _is_train_config(cls):
        return _train_view(cls, set(hidden(cls)))
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    hide = set(hidden(cls))
    specs, nested = [], {}
    for f in fields(cls):
        if f.name in hide:
            continue
        typ = hints[f.name]
        if is_dataclass(typ):
            nested[f.name] = sub = view(typ, hidden)
            default = sub.to_view(f.default_factory() if f.default_factory is not MISSING else f.default)
            specs.append((f.name, _doc(sub.cls, docs.get(f.name)), dataclasses.field(default_factory=lambda d=default: d)))
        else:
            specs.append((f.name, _doc(typ, docs.get(f.name)), _same_default(f)))
    view_cls = dataclasses.make_dataclass(cls.__name__, specs)
    view_cls.__doc__ = cls.__doc__

    def to_real(v: Any) -> Any:
        values = {f.name: getattr(v, f.name) for f in fields(v)}
        return cls(**{k: nested[k].to_real(x) if k in nested else x for k, x in values.items()})

    def to_view(real: Any) -> Any:
        return view_cls(**{s[0]: nested[s[0]].to_view(getattr(real, s[0])) if s[0] in nested else getattr(real, s[0])
                           for s in specs})

    return View(view_cls, to_real, to_view)


def _is_train_config(cls: type) -> bool:
    # By name, so that the views of other configs import no trainer (nor torch, for the registry).
    return any(f"{c.__module__}.{c.__qualname__}" == "vitscope.trainer.config.TrainConfig" for c in cls.__mro__)


def _train_view(cls: type[TrainConfig], hide: set[str]) -> View:
    """TrainConfig with ``sae`` spelt as ``--variant`` plus every family's settings; a family
    setting left at None is that family's default."""
    from vitscope.sae import Sae
    from vitscope.trainer import family_settings, train_config, train_settings
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    default_variant = cls.__dataclass_fields__["sae"].default_factory().variant
    families = list(Sae.registry)
    variant_help = "SAE family: " + "; ".join(f"{v} ({_summary(Sae.registry[v])})" for v in families)
    settings = family_settings()
    family_names = list(settings)
    family_specs = []
    for name, s in settings.items():
        owners = ", ".join(s.defaults)
        doc = next((d for v in s.defaults if (d := field_docs(Sae.registry[v].Hyper).get(name))), "")
        values = {_shown(d) for d in s.defaults.values()}
        hint = (f"(default: {values.pop()})" if len(values) == 1 else
                "(default: " + ", ".join(f"{v} {_shown(d)}" for v, d in s.defaults.items()) + ")")
        family_specs.append((name, Annotated[s.type | None, tyro.conf.arg(help=f"{owners}: {doc}",
                                                                          help_behavior_hint=hint)],
                             dataclasses.field(default=None)))
    specs: list[tuple] = []
    for f in fields(cls):
        if f.name in hide:
            continue
        if f.name == "sae":
            specs.append(("variant", Annotated[Literal[tuple(families)], tyro.conf.arg(help=variant_help)],
                          dataclasses.field(default=default_variant)))
            specs += family_specs
            continue
        specs.append((f.name, _doc(hints[f.name], docs.get(f.name)), _same_default(f)))
    view_cls = dataclasses.make_dataclass(cls.__name__, specs)
    view_cls.__doc__ = cls.__doc__
    kept = [s[0] for s in specs if s[0] not in family_names]

    def to_real(v: Any) -> TrainConfig:
        flat = {k: getattr(v, k) for k in kept}
        flat.update({k: getattr(v, k) for k in family_names if getattr(v, k) is not None})
        defaults = cls.__dataclass_fields__
        flat.update({k: defaults[k].default for k in hide})
        return train_config(flat, cls)

    def to_view(real: TrainConfig) -> Any:
        # A family setting at its family's default stays None, so that a default config does not
        # pin settings that another --variant would not have.
        flat = train_settings(real)
        family_default = settings_defaults(real.variant)
        return view_cls(**{k: flat[k] for k in kept},
                        **{k: None if flat.get(k, None) == family_default.get(k, None) else flat[k]
                           for k in family_names})

    def settings_defaults(variant: str) -> dict[str, Any]:
        return {k: s.defaults[variant] for k, s in settings.items() if variant in s.defaults}

    return View(view_cls, to_real, to_view)


def _doc(typ: Any, doc: str | None) -> Any:
    return Annotated[typ, tyro.conf.arg(help=doc)] if doc else typ


def _same_default(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.field(default=f.default) if f.default is not MISSING else dataclasses.field()


def _shown(value: Any) -> str:
    """A family's default as the help shows it (None and () mean: derived from the sizes)."""
    if value is None or value == ():
        return "auto"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _summary(family: type[Sae]) -> str:
    """A family's one-line summary, else the first line of its docstring."""
    return family.summary or inspect.cleandoc(family.__doc__ or "").split("\n")[0].rstrip(".")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under a field) of a dataclass and its bases,
    the same text tyro shows for a class it reads itself."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # built-ins, classes made at run time
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs
