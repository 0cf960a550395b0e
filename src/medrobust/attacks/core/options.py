"""Hyperparameters written once: the functional form declares them, one spec checks them, the class forwards them.

An attack's functional form is the one declaration of its hyperparameters: its keyword-only arguments give
their names, defaults and order. :func:`hyperparameters` attaches the checks, by name, next to it::

    @hyperparameters(steps=at_least(1), rel_step_size=check_positive, early_stop=flag)
    def pgd_attack(model, x, batch, objective, *, threat, steps=10, rel_step_size=None, early_stop=True, ...):

The checks run on every call (the body gets the checked, normalized values) and, through ``pgd_attack.check``,
when :class:`~medrobust.attacks.core.base.Attack` subclasses are built: ``PGD(steps=0)`` fails as
``pgd_attack(..., steps=0)`` does, with the same message. A new hyperparameter is one keyword on the functional
form (and one check); the class takes it, keeps it and forwards it with no edit.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, MutableMapping
from typing import Any

from medrobust.attacks.core.base import check_at_least
from medrobust.attacks.core.threat import NORMS, ThreatModel, check_norm

Check = Callable[[str, Any], Any]  # (name, value) -> the value, normalized; a ValueError quoting both if bad
JointCheck = Callable[[MutableMapping[str, Any]], None]  # checks that read several options, normalizing in place


def at_least(minimum: int) -> Check:
    """An integer >= ``minimum``."""
    return lambda name, value: check_at_least(name, value, minimum)


def optional(check: Check) -> Check:
    """``None``, or what ``check`` accepts."""
    return lambda name, value: None if value is None else check(name, value)


def flag(name: str, value: Any) -> bool:
    """A switch, as ``bool``."""
    return bool(value)


def non_negative(name: str, value: float) -> float:
    if not float(value) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def norm_in(supported: tuple[str, ...] = NORMS, who: str | None = None) -> Check:
    """A norm name among ``supported``, or a :class:`ThreatModel` whose norm is (the ``threat`` argument). A
    class's ``norm`` keyword is checked by its functional form's ``threat`` check."""

    def check(name: str, value: Any) -> Any:
        if isinstance(value, ThreatModel):
            check_norm(value.norm, supported, who)
            return value
        return check_norm(value, supported, who)

    return check


def hyperparameters(*joint: JointCheck, **checks: Check) -> Callable[[Callable], Callable]:
    """Decorate a functional form: before each call, its arguments named in ``checks`` go through their check,
    then the whole set through each ``joint`` check (those reading several options, e.g. a loss allowed only
    untargeted). The decorated function keeps its signature and gets ``.check(options) -> options``, which
    checks a dict of some of its keywords (plus a class's ``norm``, under the ``threat`` check) the same way.
    """

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        unknown = sorted(set(checks) - set(signature.parameters))
        if unknown:  # a misspelt check would silently check nothing
            raise TypeError(f"{fn.__name__} has no arguments {unknown} to check")
        default_norm = checks.get("threat", norm_in())

        def check(options: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
            for name, rule in checks.items():
                if name in options:
                    options[name] = rule(name, options[name])
            if "norm" in options and "norm" not in signature.parameters:  # a class's norm: its threat's
                options["norm"] = default_norm("norm", options["norm"])
            for rule in joint:
                rule(options)
            return options

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as error:
                raise TypeError(f"{fn.__name__}(): {error}") from None
            bound.apply_defaults()
            check(bound.arguments)
            return fn(*bound.args, **bound.kwargs)

        checked.check = check
        return checked

    return decorate
