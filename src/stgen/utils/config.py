"""Helpers of the config dataclasses: YAML number coercion and range checks."""

from __future__ import annotations

import math
from dataclasses import fields
from stgen.errors import InputError


#: annotations of optional numeric config fields -> a value of their number type
OPTIONAL_NUMBERS = {"int|None": 0, "float|None": 0.0, "Optional[int]": 0, "Optional[float]": 0.0}


def coerce_numbers(cfg: object, section: str) -> None:
    """Convert a config dataclass's numeric fields in place (YAML gives ``1e-3`` as a string).

    A field whose default is a float becomes ``float``; one whose default is an
    int must hold a whole number and becomes ``int``; InputError (a
    ValueError) naming ``section.field`` otherwise (a bool is not a number
    here). An optional field (annotated ``int | None`` or ``float | None``)
    may hold None and is coerced like its number type otherwise. Fields with
    a bool default are left alone.
    """
    for f in fields(cfg):
        v, d = getattr(cfg, f.name), f.default
        optional = OPTIONAL_NUMBERS.get(str(f.type).replace(" ", ""))
        if optional is not None and d is None:
            d = optional
        if v is None or isinstance(d, bool) or not isinstance(d, (int, float)):
            continue
        try:
            if isinstance(v, bool):  # YAML true/false in a numeric field is a mistake, not 1/0
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{section}.{f.name} must be a number, got {v!r}") from None
        if not math.isfinite(x):
            raise InputError(f"{section}.{f.name} must be finite, got {v!r}")
        if isinstance(d, int):
            if x != int(x):
                raise InputError(f"{section}.{f.name} must be a whole number, got {v!r}")
            x = int(x)
        setattr(cfg, f.name, x)



def check_ranges(cfg: object, section: str, *, at_least_1: tuple[str, ...] = (), at_least_0: tuple[str, ...] = (),
                 positive: tuple[str, ...] = (), fraction: tuple[str, ...] = ()) -> None:
    """InputError naming ``section.field`` for the first field out of its range: ``at_least_1`` >= 1,
    ``at_least_0`` >= 0, ``positive`` > 0, ``fraction`` in [0, 1) (NaN is out of every range).
    Used by the config dataclasses' ``__post_init__`` after :func:`coerce_numbers`."""
    for names, ok, rule in ((at_least_1, lambda v: v >= 1, ">= 1"), (at_least_0, lambda v: v >= 0, ">= 0"),
                            (positive, lambda v: v > 0, "> 0"), (fraction, lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            v = getattr(cfg, name)
            if not ok(v):
                raise InputError(f"{section}.{name} must be {rule}, got {v!r}")


def check_divisible(cfg: object, section: str, width: str, *heads: str) -> None:
    """InputError naming ``section.width`` and the first ``section.<heads>`` field that does not divide it
    (attention splits a width into equal heads). Call after :func:`check_ranges` has checked the heads >= 1."""
    w = getattr(cfg, width)
    for name in heads:
        h = getattr(cfg, name)
        if w % h:
            raise InputError(f"{section}.{width} {w} is not divisible by {section}.{name} {h}")


def spot_pitches(cfg: object, section: str, name: str) -> None:
    """Check ``cfg.<name>`` is a list of positive spot pitches (HINGE's and FLAG's ``context_radii``) and store
    it as a list of floats; InputError naming ``section.name`` otherwise (a bool is not a number here)."""
    v = getattr(cfg, name)
    if not isinstance(v, (list, tuple)) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in v):
        raise InputError(f"{section}.{name} must be a list of positive spot pitches, got {v!r}")
    setattr(cfg, name, [float(r) for r in v])
