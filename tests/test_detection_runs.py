"""task=luna end to end where the contract test does not go: 3-D cubes through PGD training and the detection
evaluation (PGD-10, TOG vanishing and fabrication), the checkpoint carrying seed 004's taus, and ``python eval.py``
on it as the real subprocess a user runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config, run_script
from medrobust.reporting import read_csv
from medrobust.tasks.detection_metrics import sensitivity_at_fp_rates
from medrobust.runner import build_callbacks, build_data_and_module, build_loggers, build_trainer

DETECTION_3D = ["adv=pgd", "eval=detection", "data.spatial_dims=3", "data.image_size=32"]


@pytest.fixture(scope="module")
def luna_3d(tiny_for, tmp_path_factory):
    """A tiny 3-D task=luna run, PGD-trained and evaluated with eval=detection, in process."""
    out = tmp_path_factory.mktemp("luna_3d")
    overrides = [*tiny_for("luna"), *DETECTION_3D]
    cfg = compose_config("train", overrides, out)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    return out, overrides, next(iter(datamodule.test_dataloader()))


def test_3d_cubes_train_and_report_detection_curves(luna_3d):
    out, _, batch = luna_3d
    assert batch["image"].shape[1:] == (1, 32, 32, 32) and batch["boxes"].shape[-1] == 6
    rows = [r for r in read_csv(out / "robustness.csv") if r["split"] == "test"]
    metrics = {(r["attack"], r["metric"]) for r in rows}
    for attack in ("pgd10_linf", "tog-vanishing", "tog-fabrication"):
        assert any(a.startswith(attack.split("-")[0]) for a, _ in metrics), (attack, sorted(metrics)[:10])
    # vanished_rate needs a target found on a clean image, which a one-epoch model may not find: left out then
    assert {"cpm", "mean_iou", "map_50", "map_50_95"} <= {m for a, m in metrics if a.startswith("pgd10")}
    assert any(m == "tog_success" for _, m in metrics) and any(m == "fabricated" for _, m in metrics)
    for row in rows:
        if row["metric"] in ("cpm", "mean_iou", "map_50", "accuracy") and row["value"] != "":
            assert 0.0 <= float(row["value"]) <= 1.0, row
    assert (out / "examples" / "test_pgd10_linf_eps0p008.png").is_file()
    assert "mean_iou" in (out / "summary.md").read_text()


def test_the_froc_behind_each_cpm_is_on_disk_read_at_the_same_points(luna_3d):
    """curves/test_froc.csv holds a FROC for every cpm row of robustness.csv (the clean one once), each giving that
    row's CPM at LUNA16's seven rates; a PNG per attack; a summary.md table. (This one-epoch model's CPMs may all
    be 0: test_detection_task checks the values on a fitted detector whose CPM moves with eps.)"""
    out, _, _ = luna_3d
    cpm = {(r["attack"], float(r["eps"])): float(r["value"]) for r in read_csv(out / "robustness.csv")
           if r["split"] == "test" and r["metric"] == "cpm"}
    points: dict[tuple[str, float], list] = {}
    with open(out / "curves" / "test_froc.csv", newline="") as handle:
        froc_rows = list(csv.DictReader(handle))
    for row in froc_rows:
        points.setdefault((row["attack"], float(row["eps"])), []).append((float(row["x"]), float(row["y"])))
    assert set(points) == {("clean", 0.0)} | {cell for cell in cpm if cell[1] > 0}
    for (attack, eps), xy in points.items():
        fps, sensitivity = (np.array(values) for values in zip(*xy))
        expected = cpm[next(a for a, e in cpm if e == 0), 0.0] if attack == "clean" else cpm[attack, eps]
        assert float(sensitivity_at_fp_rates(fps, sensitivity).mean()) == pytest.approx(expected, abs=1e-6)
    assert (out / "curves" / "test_pgd10_linf_froc.png").is_file()
    assert "# FROC (cpm)" in (out / "summary.md").read_text()


def test_the_checkpoint_carries_the_clean_validation_taus(luna_3d):
    out, _, _ = luna_3d
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    taus = state["validation_tau"]
    assert taus.shape == (3,) and all(math.isfinite(t) and t >= 0 for t in taus.tolist())


@pytest.mark.slow
def test_eval_py_attacks_a_detection_checkpoint(luna_3d, tmp_path):
    out, overrides, _ = luna_3d
    args = [*overrides, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}"]
    result = run_script("eval.py", [a for a in args if not a.startswith("adv=")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_csv(Path(tmp_path) / "robustness.csv")
    assert any(r["split"] == "test" and r["metric"] == "cpm" for r in rows)
    assert (Path(tmp_path) / "summary.md").is_file()


def test_retinanet_trains_with_trades_and_is_attacked_like_the_centernet(tiny_for, tmp_path):
    """model=retinanet through TRADES training (its output divergence), the clean validation's taus of its two terms,
    and eval=detection's PGD and TOG rows."""
    overrides = [*tiny_for("luna"), "model=retinanet", "adv=trades", "adv.clean_epochs=0", "eval=detection"]
    cfg = compose_config("train", overrides, tmp_path)
    datamodule, module = build_data_and_module(cfg)
    trainer = build_trainer(cfg, build_callbacks(cfg), build_loggers(cfg))
    trainer.fit(module, datamodule=datamodule)
    assert type(module.net).__name__ == "RetinaNet"
    taus = module.validation_tau.tolist()
    assert len(taus) == 2 and all(math.isfinite(t) and t >= 0 for t in taus)
    assert {"val/tau_classification", "val/tau_box"} <= set(trainer.callback_metrics)
    trainer.test(module, datamodule=datamodule, ckpt_path="best")  # batches of inference tensors there
    rows = read_csv(tmp_path / "robustness.csv")
    metrics = {(r["attack"].split("-")[0], r["metric"]) for r in rows if r["split"] == "test"}
    assert {("pgd10_linf", "cpm"), ("pgd10_linf", "mean_iou"), ("tog", "tog_success"), ("tog", "fabricated")} <= metrics
