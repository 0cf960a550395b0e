"""Accuracy without the most attack-sensitive samples (eval.sensitivity_drop): known answers on hand-made radii,
ties, rounding, bad values, eps units, and one tiny run's rows, summary section and PNG."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medrobust.attacks import FGSM
from medrobust.callbacks import RobustnessEvaluation
from medrobust.evaluation.sensitivity import (
    accuracy_from_radii,
    check_drop,
    dropped_count,
    sensitive_mask,
    sensitivity_curve,
)
from medrobust.evaluation.suites import curve_suite
from medrobust.reporting import read_csv
from medrobust.reporting.sensitivity import SENSITIVITY_METRIC, sensitivity_markdown, sensitivity_rows
from conftest import compose_config

INF = float("inf")
EPS = [0.0, 0.001, 0.002, 0.004]


def test_known_answer_sets_aside_the_zero_radius_sample():
    radii = torch.tensor([0.0, 0.001, 0.002, 0.003, INF])
    assert sensitive_mask(radii, 0.2).tolist() == [True, False, False, False, False]
    curve = sensitivity_curve(radii, EPS, 0.2)
    # robust at eps exactly when radius > eps: a radius equal to eps is fooled there
    assert curve.all == pytest.approx([4 / 5, 3 / 5, 2 / 5, 1 / 5])
    assert curve.kept == pytest.approx([4 / 4, 3 / 4, 2 / 4, 1 / 4])
    assert (curve.samples, curve.samples_kept, curve.eps) == (5, 4, EPS)


def test_ties_go_to_the_earlier_sample_and_do_not_change_the_accuracy():
    radii = torch.tensor([0.001, 0.003, 0.001, 0.001])
    assert sensitive_mask(radii, 0.5).tolist() == [True, False, True, False]  # 2 of 3 tied: the first two
    zeros_first = torch.tensor([0.002, 0.0, 0.002, 0.0, 0.001])
    assert sensitive_mask(zeros_first, 0.4).tolist() == [False, True, False, True, False]
    assert sensitive_mask(zeros_first, 0.6).tolist() == [False, True, False, True, True]
    shuffled = radii[torch.tensor([3, 1, 0, 2])]
    assert sensitivity_curve(shuffled, EPS, 0.5) == sensitivity_curve(radii, EPS, 0.5)


@pytest.mark.parametrize(("n", "drop", "count"), [
    (5, 0.2, 1), (7, 0.2, 1), (8, 0.2, 2), (30, 0.1, 3), (10, 0.25, 3), (1, 0.9, 0), (2, 0.75, 1), (0, 0.2, 0)])
def test_dropped_count_is_the_nearest_whole_number_with_one_sample_kept(n, drop, count):
    assert dropped_count(n, drop) == count


@pytest.mark.parametrize("drop", [0, 0.0, None])
def test_drop_zero_is_off_and_keeps_every_sample(drop):
    radii = torch.tensor([0.0, 0.0015, INF, 0.003, 0.0005])
    assert check_drop(drop) is None
    curve = sensitivity_curve(radii, EPS, drop)
    assert curve.kept == curve.all == accuracy_from_radii(radii, EPS) and curve.samples_kept == 5


@pytest.mark.parametrize("drop", [-0.1, 1.0, 1.5, float("nan"), "0.2", True])
def test_bad_fractions_are_rejected_naming_the_key(drop):
    with pytest.raises(ValueError, match=r"eval.sensitivity_drop must be a fraction in \[0, 1\)"):
        RobustnessEvaluation([curve_suite()], sensitivity_drop=drop)


def test_sensitivity_without_a_curve_attack_or_with_range_eps_is_an_error():
    with pytest.raises(ValueError, match=r"eval.sensitivity_drop=0.2 needs a curve attack .* \['fgsm_linf'\]"):
        RobustnessEvaluation([FGSM()], sensitivity_drop=0.2)
    with pytest.raises(ValueError, match="eval.sensitivity_drop needs eval.eps_unit model or native, got 'range'"):
        RobustnessEvaluation([curve_suite()], eps_unit="range", sensitivity_drop=0.2)
    assert RobustnessEvaluation([FGSM()], sensitivity_drop=0).sensitivity_drop is None


def test_native_eps_are_compared_with_the_radii_in_model_units():
    """eps 1.4 and 2.8 HU through a 1400 HU window are 0.001 and 0.002 in model units."""
    from medrobust.callbacks.robustness_evaluation import Evaluation

    evaluation = RobustnessEvaluation([curve_suite()], eps=[1.4, 2.8], eps_unit="native", sensitivity_drop=0.2)
    result = Evaluation(radii={"fmn-curve_linf": torch.tensor([0.0, 0.0015, 0.0025, INF, 0.0005])})
    module = SimpleNamespace(intensity=SimpleNamespace(eps_to_model=lambda eps: eps / 1400))
    rows = evaluation._sensitivity_rows(module, result, "val", 3)
    assert [(r["eps"], r["eps_unit"], r["metric"]) for r in rows] == [
        (0.0, "native", SENSITIVITY_METRIC), (1.4, "native", SENSITIVITY_METRIC), (2.8, "native", SENSITIVITY_METRIC)]
    assert [r["value"] for r in rows] == pytest.approx([1.0, 3 / 4, 2 / 4])  # the 0 radius set aside
    assert result.sensitivity["fmn-curve_linf"].all == pytest.approx([4 / 5, 3 / 5, 2 / 5])


def test_rows_and_section_say_what_was_kept():
    curve = sensitivity_curve(torch.tensor([0.0, 0.001, 0.002, 0.003, INF]), EPS, 0.2)
    rows = sensitivity_rows(curve, epoch=2, split="test", attack="fmn-curve_linf", norm="linf", eps_unit="model")
    assert [(r["eps"], r["points"]) for r in rows] == [(0.0, "clean"), (0.001, "first_failure"),
                                                      (0.002, "first_failure"), (0.004, "first_failure")]
    text = sensitivity_markdown({"fmn-curve_linf": curve}, "test", 2, "model")
    assert "| eps | accuracy all | accuracy without the most sensitive 20 % | samples kept |" in text
    assert "| 0.001 | 0.6000 | 0.7500 | 4 of 5 |" in text


def _section_table(text: str) -> dict[float, tuple[float, float]]:
    """eps -> (accuracy all, accuracy kept) from the sensitivity section of summary.md."""
    section = text[text.index("# Accuracy without the most attack-sensitive samples"):]
    cells = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "eps" not in line]
    return {float(c[0]): (float(c[1]), float(c[2])) for c in cells}


class MeanIntensity(torch.nn.Module):
    """Positive where the image's mean intensity exceeds ``threshold``: its Linf radius is about the distance of the
    mean to the threshold, so on the tiny LIDC images (means 0.12 to 0.23) the radii spread over eps 0.01 to 0.08,
    where the tiny run's briefly trained CNN calls nearly every sample positive (radii all 0 or inf)."""

    def __init__(self, threshold: float = 0.2):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        shift = x.flatten(1).mean(1) - self.threshold
        return torch.stack([-shift, shift], dim=1) * 50


def test_a_tiny_curve_run_writes_rows_section_and_png_agreeing_with_the_curve(tiny_for, tmp_path):
    from medrobust.runner import build_callbacks, build_data_and_module, build_trainer

    eps = [0.0, 0.01, 0.03, 0.06, 0.1]
    cfg = compose_config("train", [*tiny_for("lidc"), "eval=curve", f"eval.eps={eps}"], tmp_path)
    assert cfg.eval.sensitivity_drop == 0.2
    assert compose_config("train", ["eval=curve_l1"], tmp_path).eval.sensitivity_drop == 0.2
    assert compose_config("train", ["eval=quick"], tmp_path).eval.get("sensitivity_drop") is None
    datamodule, module = build_data_and_module(cfg)
    module.net = MeanIntensity()
    trainer = build_trainer(cfg, build_callbacks(cfg), [])
    trainer.validate(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    rows = read_csv(tmp_path / "robustness.csv")
    attack, curves = "fmn-curve_linf", tmp_path / "curves"
    for split in ("val", "test"):
        mine = [r for r in rows if r["split"] == split and r["attack"] == attack]
        radii = torch.tensor([r["value"] for r in mine if r["metric"] == "radius"])
        accuracy = {r["eps"]: r["value"] for r in mine if r["metric"] == "accuracy"}
        kept = {r["eps"]: r["value"] for r in mine if r["metric"] == SENSITIVITY_METRIC}
        assert sorted(kept) == sorted(accuracy) == eps and len(set(accuracy.values())) > 2  # the curve moves
        curve = sensitivity_curve(radii, eps, 0.2)
        assert curve.samples_kept == len(radii) - round(0.2 * len(radii)) and radii.min() >= 0
        # from the radii alone, the same accuracy as the curve attack's own rows (eps 0: the clean accuracy)
        assert curve.all == pytest.approx([accuracy[e] for e in eps], abs=1e-6)
        assert curve.kept == pytest.approx([kept[e] for e in eps], abs=1e-6)
        assert all(k >= a for k, a in zip(curve.kept, curve.all)) and curve.kept != curve.all
        assert (curves / f"{split}_{attack}_{SENSITIVITY_METRIC}.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    table = _section_table(summary)
    assert sorted(table) == eps and all(math.isclose(table[e][0], accuracy[e], abs_tol=1e-4)
                                        and math.isclose(table[e][1], kept[e], abs_tol=1e-4) for e in eps)
    robustness_section = summary[:summary.index("# Accuracy without")]
    assert "Robustness summary" in robustness_section and SENSITIVITY_METRIC not in robustness_section
    # the classifier's own sensitivity curve keeps its PNG; the per-metric curves leave the new rows out
    assert {"test_fmn-curve_linf_sensitivity.png", f"test_{attack}_{SENSITIVITY_METRIC}.png"} <= {
        p.name for p in curves.glob("*.png")}
    assert not list(curves.glob(f"*{SENSITIVITY_METRIC}_by_part.png")) and not list(
        curves.glob(f"{attack}_{SENSITIVITY_METRIC}.png"))


class _PastTheBall:
    """A verifying attack whose points sit a rounding error outside its eps (as a float32 clamp can leave them)."""

    def attack_from(self, start, model, x, batch, objective, *, eps, bounds):
        return x + eps.view(-1, *([1] * (x.dim() - 1))) * (1 + 1e-6)


class _OnlyCleanCorrect:
    """Right on the clean (zero) image only: any verified point fools it."""

    def attack_loss(self, output, batch):
        return output.flatten(1).abs().sum(1)

    def is_correct(self, output, batch):
        return output.flatten(1).abs().amax(1) == 0


def test_verified_radii_never_exceed_the_eps_where_the_curve_counts_the_sample_fooled():
    """The radius-based accuracy (this analysis) must equal the curve's: a point fooling at eps lowers the radius
    to at most that eps, even when its computed norm rounds just above it."""
    from medrobust.evaluation.curve import verified_curve

    x = torch.zeros(3, 1, 2, 2)
    eps_values = [0.0, 0.001, 0.002]
    known = (x + 1.0, torch.ones(3))  # minimum-norm points far out: every eps below the radius is verified
    points, radii = verified_curve(_PastTheBall(), lambda v: v, x, {"image": x}, _OnlyCleanCorrect(),
                                   eps_values=eps_values, bounds=None, known=known, norm="linf")
    fooled_by_curve = [float((points[j].flatten(1).abs().amax(1) > 0).float().mean()) for j in range(3)]
    assert radii.tolist() == pytest.approx([0.001] * 3) and bool((radii <= 0.001).all())
    assert accuracy_from_radii(radii, eps_values) == [1 - f for f in fooled_by_curve] == [1.0, 0.0, 0.0]
