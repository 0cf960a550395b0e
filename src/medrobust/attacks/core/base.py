"""What an attack declares (its base classes) and the argument checks attacks share."""

from __future__ import annotations

import copy as _copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from torch import Tensor

from medrobust.attacks.core.threat import ThreatModel


def check_at_least(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value: float | None) -> float | None:
    if value is not None and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return None if value is None else float(value)


def check_fraction(name: str, value: float) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


class Perturbation:
    """What an evaluation applies to images at a strength ``eps``: an attack, or a corruption.

    Declared here, with their defaults, is everything the evaluation, the curves and the masking checks read
    off one; a subclass overrides what differs (class attributes, or hooks):

    - ``name`` (str) and ``norm`` (``"linf"``, ``"l2"``, ``"l1"``; ``"none"`` for corruptions): its label
      ``<name>_<norm>`` in tables and curves;
    - ``seeks_errors`` (True): it tries to make samples wrong (``is_correct`` false). ``False`` (corruptions,
      prediction shifts): curves apply it at each eps on every sample alone, the masking checks skip it;
    - ``black_box`` (False): forwards and scores only; the masking checks flag it beating white-box attacks;
    - ``targeted`` (False): it pushes samples towards chosen classes, so it stays out of the masking checks'
      strength order (a targeted attack is not a weaker untargeted one);
    - ``climbs_own_loss`` (False): it climbs a loss of its own on the labels instead of the objective's
      ``attack_loss`` (APGD with ``loss="ce"``); a wrapper that swaps the objective cannot steer it;
    - ``bn_eval`` / ``dropout_eval`` (True): normalization and dropout layers in eval mode while it runs
      (:func:`~medrobust.attacks.core.session.attack_session`);
    - ``requires`` (()): task-module members it needs beyond the task contract (``("prediction",)``), checked
      when an evaluation is set up;
    - ``survivors_had_full_budget`` (False): a sample the attack leaves correct went through all that
      :meth:`full_budget` would do to it, so the point returned for it already is a worst-loss point (true where
      the full-budget form only drops the stop on ``is_correct``); worst-case curves then attack only the others;
    - ``extra_metrics`` (()): metrics of its own, beside the task's (a targeted attack's success rate), which
      :meth:`extra_values` computes per sample at its points; curves, the CSV and the summary carry them;
      :meth:`example_marks` adds what it aimed at to the example images (a targeted attack's targets);
    - ``reset_stats()`` / ``black_box_wins()``: running tallies over an evaluation (cascades keep them) and the
      messages they raise; by default none.
    """

    name: str
    norm: str
    seeks_errors: bool = True
    black_box: bool = False
    targeted: bool = False
    climbs_own_loss: bool = False
    bn_eval: bool = True
    dropout_eval: bool = True
    requires: tuple[str, ...] = ()
    survivors_had_full_budget: bool = False
    extra_metrics: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``<name>_<norm>``: the attack column of tables, curves and W&B keys."""
        return f"{self.name}_{self.norm}"

    def __call__(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                 eps: float | Tensor, bounds: tuple[float, float] | None) -> Tensor:
        """Perturbed images ``(B, C, *spatial)`` for ``x`` at strength ``eps`` (float or ``(B,)``, model units)."""
        raise NotImplementedError

    def full_budget(self) -> "Perturbation | None":
        """This attack spending its whole budget on every sample and returning, per sample, the highest-loss
        point it visits: the worst case that continuous metrics (MAE, Dice, AUROC) are read at. ``None`` (the
        default) where it has no such mode; curves then read those metrics at its own points and say so."""
        return None

    def extra_values(self, task: Any, output: Any, clean_output: Any, batch: Mapping) -> dict[str, Tensor]:
        """Per-sample values ``(B,)`` of each of :attr:`extra_metrics` at the model's ``output`` for this attack's
        points, given the clean output and the batch (their mean over the evaluation is the metric)."""
        return {}

    def example_marks(self, task: Any, clean_output: Any, batch: Mapping) -> dict[str, Tensor]:
        """Extra rows for the example images, name -> label maps or point sets (none by default)."""
        return {}

    def reset_stats(self) -> None:
        """Zero any running tallies before an evaluation (none by default)."""

    def sum_stats(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Replace the running tallies by their sums over the DDP ranks, ``reduce_sum`` summing a tensor across
        them (every rank calls this, in the same order); none by default."""

    def black_box_wins(self) -> list[str]:
        """Messages for black-box parts that broke what white-box parts left standing (none by default)."""
        return []

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if key != "name")
        return f"{type(self).__name__}({args})"


def without_early_stop(attack: "Attack") -> "Attack":
    """A copy of ``attack`` with ``early_stop=False`` (its full-budget form, for attacks that stop early). The
    option is an attribute and :attr:`Attack.options` reads it, so the copy's functional form runs without."""
    copy = _copy.copy(attack)
    copy.early_stop = False
    return copy


# keywords of a functional form that describe one call, not an attack: never a class's hyperparameters
PER_CALL = ("threat", "bounds", "step_size", "start", "max_eps", "return_result", "return_norms")


class Attack(Perturbation):
    """Base of the configurable attacks: hyperparameters at construction, ``eps`` and ``bounds`` per call.

    Subclasses set ``name`` and ``norm`` (class attributes, or properties of the options) and declare
    ``functional = staticmethod(pgd_attack)``, their functional form (decorated with
    :func:`~medrobust.attacks.core.options.hyperparameters`). Its keyword-only arguments, less
    :data:`PER_CALL`, are then the class's keywords, with its defaults (``defaults`` overrides some); ``norm``
    comes first for a functional that takes a ``threat``. The class checks them with the functional's own
    checks, keeps them as attributes (``attack.steps``) and :meth:`attack` forwards them, ``**self.options``:
    none is written twice. ``first`` names the one keyword that may also be given by position
    (``PGD("l2")``). Attacks without a functional form (wrappers, cascades) define ``__init__`` and
    :meth:`attack` themselves. The capabilities they declare are listed on :class:`Perturbation`.
    """

    functional: Callable | None = None
    defaults: Mapping[str, Any] = {}
    first: str = "norm"
    _option_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.functional is not None:
            cls._signature, cls._option_names = _class_signature(cls)
            cls.__signature__ = cls._signature if cls.__init__ is Attack.__init__ else None  # what help() shows

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The keywords of the class's signature (see the class docstring), checked as its functional form
        checks them: a bad value fails here, quoting the argument and the value."""
        if self.functional is None:
            raise TypeError(f"{type(self).__name__} has no functional form: declare one or define __init__")
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}(): {error}") from None
        bound.apply_defaults()
        vars(self).update(self.functional.check(dict(bound.arguments)))

    @property
    def options(self) -> dict[str, Any]:
        """The hyperparameters :meth:`attack` forwards to the functional form (``norm`` travels in the threat
        model), read off the attributes: a copy with one changed (:func:`without_early_stop`) forwards it."""
        return {name: getattr(self, name) for name in self._option_names}

    def __call__(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                 eps: float | Tensor, bounds: tuple[float, float] | None) -> Tensor:
        """Adversarial images ``(B, C, *spatial)`` for ``x``; ``eps`` in model units, float or ``(B,)``."""
        return self.attack(model, x, batch, objective, threat=ThreatModel(self.norm, eps, bounds))

    def attack(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *, threat: ThreatModel,
               **per_call: Any) -> Tensor:
        """The functional form on ``x`` ``(B, C, *spatial)`` with ``threat``, ``per_call`` keywords (PGD's
        ``start``) and the options."""
        if self.functional is None:
            raise NotImplementedError
        return self.functional(model, x, batch, objective, threat=threat, **per_call, **self.options)

    def attack_from(self, start: Tensor, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
                    eps: float | Tensor, bounds: tuple[float, float] | None) -> Tensor:
        """As a call, started from ``start`` ``(B, C, *spatial)`` where the attack can warm-start (PGD); by
        default the start is ignored."""
        return self(model, x, batch, objective, eps=eps, bounds=bounds)


def _class_signature(cls: type[Attack]) -> tuple[inspect.Signature, tuple[str, ...]]:
    """The class's keywords, from its functional form (see :class:`Attack`), and the names it forwards."""
    arguments = inspect.signature(cls.functional).parameters
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [p for p in arguments.values() if p.kind is keyword and p.name not in PER_CALL]
    forwarded = tuple(p.name for p in params)
    if "threat" in arguments:  # the class holds the norm; eps and bounds come per call
        params.insert(0, inspect.Parameter("norm", keyword, default="linf", annotation="str"))
    names = [p.name for p in params]
    unknown = sorted(set(cls.defaults) - set(names)) + ([] if cls.first in names else [cls.first])
    if unknown:
        raise TypeError(f"{cls.__name__} names {unknown}, which {cls.functional.__name__} does not take")
    params = [p.replace(default=cls.defaults.get(p.name, p.default)) for p in params]
    lead = next(p for p in params if p.name == cls.first)
    rest = [p for p in params if p is not lead]
    return inspect.Signature([lead.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)] + rest), forwarded


class CurveAttack(Attack):
    """An attack that reads a whole robustness curve off one run (a minimum-norm attack's radii).

    The evaluation asks it for :meth:`curve` instead of attacking at each eps; after each call ``last_radii``
    holds the per-sample radii ``(B,)`` it found (``inf`` where none), which the evaluation writes out.
    """

    last_radii: Tensor | None = None

    def curve(self, model: Callable, x: Tensor, batch: Mapping, objective: Any, *,
              eps_values: Sequence[float | Tensor], bounds: tuple[float, float] | None) -> list[Tensor]:
        """Adversarial images ``(B, C, *spatial)`` for each of ``eps_values`` (non-decreasing)."""
        raise NotImplementedError
