"""Threat model geometry, eps units and batch indexing (medrobust.attacks.core)."""

from __future__ import annotations

import pytest
import torch

from medrobust.attacks import ThreatModel, batch_view, index_batch, resolve_eps
from medrobust.attacks.core.threat import constrain, lp_norm, project, random_in_ball
from medrobust.data.intensity import IntensityWindow

SHAPES = [(6, 2, 5, 7), (6, 1, 3, 4, 5)]  # (B, C, H, W) and (B, C, D, H, W)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_view_matches_rank(shape):
    like = torch.zeros(shape)
    assert batch_view(torch.arange(6.0), like).shape == (6,) + (1,) * (len(shape) - 1)
    assert batch_view(torch.tensor(2.0), like).shape == ()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_and_random_start_stay_in_per_sample_ball(shape, norm):
    torch.manual_seed(0)
    eps = torch.linspace(0.0, 1.0, shape[0], dtype=torch.float64)
    delta = torch.randn(shape, dtype=torch.float64) * 3
    projected = project(delta, norm, eps)
    assert (lp_norm(projected, norm) <= eps + 1e-12).all()
    inside = delta * 1e-3  # already inside the ball (except the eps=0 sample): untouched
    assert torch.allclose(project(inside, norm, eps)[1:], inside[1:])
    start = random_in_ball(delta, norm, eps)
    assert (lp_norm(start, norm) <= eps + 1e-12).all()
    assert (lp_norm(start, norm)[1:] > 0).all()


def test_constrain_clamps_into_bounds_and_stays_in_ball():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64) * 4 - 1  # inside (-1, 3)
    far = x + torch.randn_like(x) * 10
    eps = torch.full((8,), 0.5, dtype=torch.float64)
    for norm in ("linf", "l2", "l1"):
        x_adv = constrain(x, far, norm, eps, (-1.0, 3.0))
        assert x_adv.min() >= -1 and x_adv.max() <= 3
        assert (lp_norm(x_adv - x, norm) <= 0.5 + 1e-12).all()
    assert torch.equal(constrain(x, x + 0.1, "linf", eps, None), x + 0.1)  # unbounded


def test_threat_model_validates_with_the_bad_value():
    with pytest.raises(ValueError, match=r"'l3'.*linf"):
        ThreatModel("l3", 0.1, None)
    with pytest.raises(ValueError, match="-0.5"):
        ThreatModel("linf", -0.5, None)
    with pytest.raises(ValueError, match=r"-0\.1"):
        ThreatModel("linf", torch.tensor([0.1, -0.1]), None)
    with pytest.raises(ValueError, match=r"\(3\.0, 1\.0\)"):
        ThreatModel("linf", 0.1, (3.0, 1.0))
    threat = ThreatModel("l2", torch.tensor([0.1, 0.2]), [0, 1])  # Hydra gives lists
    assert threat.bounds == (0.0, 1.0)
    with pytest.raises(ValueError, match="2 values for a batch of 3"):
        threat.eps_for(torch.zeros(3, 1, 2, 2))
    assert ThreatModel("linf", torch.tensor(0.25)).eps == 0.25  # 0-d tensor -> float


def test_resolve_eps_units():
    x = torch.stack([torch.full((1, 4, 4), 2.0), torch.linspace(-1, 3, 16).reshape(1, 4, 4)])
    assert resolve_eps(0.004, "model") == 0.004
    window = IntensityWindow(-1000, 400)
    assert resolve_eps(1.4, "native", intensity=window) == pytest.approx(0.001)
    ranged = resolve_eps(0.01, "range", x=x)
    assert torch.allclose(ranged, torch.tensor([0.0, 0.04]))  # a constant image has no range
    with pytest.raises(ValueError, match="intensity"):
        resolve_eps(1.4, "native")
    with pytest.raises(ValueError, match="needs the images"):
        resolve_eps(0.01, "range")
    with pytest.raises(ValueError, match=r"'hu'.*'model', 'native', 'range'"):
        resolve_eps(1.0, "hu")
    with pytest.raises(ValueError, match="-1"):
        resolve_eps(-1, "model")


def test_index_batch_selects_per_sample_entries_only():
    batch = {
        "image": torch.arange(4.0).reshape(4, 1, 1, 1),
        "label": torch.tensor([0, 1, 2, 3]),
        "ids": ["a", "b", "c", "d"],
        "spacing": (1, 2, 3, 4),
        "class_weights": torch.ones(3),  # not per-sample: passes
        "scale": torch.tensor(2.0),
        "name": "lidc",
        "meta": {"path": ["p0", "p1", "p2", "p3"], "affine": torch.eye(4).expand(4, 4, 4)},
    }
    picked = index_batch(batch, torch.tensor([True, False, True, False]))
    assert picked["label"].tolist() == [0, 2] and picked["ids"] == ["a", "c"] and picked["spacing"] == (1, 3)
    assert picked["class_weights"] is batch["class_weights"] and picked["scale"] is batch["scale"]
    assert picked["name"] == "lidc" and picked["meta"]["path"] == ["p0", "p2"]
    assert picked["meta"]["affine"].shape == (2, 4, 4)
    assert index_batch(batch, slice(1, 3))["ids"] == ["b", "c"]
    assert index_batch(batch, torch.tensor([3, 3, 0]))["label"].tolist() == [3, 3, 0]
    assert index_batch(batch, [1])["ids"] == ["b"]
    assert index_batch({"label": batch["label"]}, [2], batch_size=4)["label"].tolist() == [2]
    with pytest.raises(ValueError, match="batch_size"):
        index_batch({"label": batch["label"]}, [2])
