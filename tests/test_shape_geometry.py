"""Known answers for the shape-reconstruction geometry: outlines of masks, the PCA shape model, the TPS warp."""

from __future__ import annotations

import numpy as np
import pytest

from medrobust.data.shape_outline import outline_points, polygon_mask, signed_area
from medrobust.data.shape_pca import ShapeModel
from medrobust.data.shape_warp import border_anchors, tps_warp, warp_image_and_mask

K = 32


def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def ellipse(shape: tuple[int, int], centre: tuple[float, float], a: float, b: float) -> np.ndarray:
    """Semi-axis ``a`` along rows, ``b`` along cols."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return ((rr - centre[0]) / a) ** 2 + ((cc - centre[1]) / b) ** 2 <= 1


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def ellipse_points(a: float, b: float, centre: tuple[float, float], k: int = K) -> np.ndarray:
    """Exact ellipse at equal parameter steps, starting at the top and running counter-clockwise on screen."""
    t = 2 * np.pi * np.arange(k) / k
    return np.stack([centre[0] - a * np.cos(t), centre[1] - b * np.sin(t)], axis=1)


# ---- outlines ---------------------------------------------------------------------------------------------------


def test_disk_outline_known_answer():
    m = disk((40, 40), (20, 19), 10)
    p = outline_points(m, 64)
    assert p.shape == (64, 2) and p.dtype == np.float32
    radius = np.hypot(p[:, 0] - 20, p[:, 1] - 19)
    assert np.all(np.abs(radius - 10) <= 0.5 + 1e-6)  # the 0.5-level contour lies between inside and outside
    gaps = np.linalg.norm(np.diff(np.vstack([p, p[:1]]), axis=0), axis=1)
    assert np.abs(gaps / gaps.mean() - 1).max() < 0.06  # even by arc length; chords across corners a bit shorter
    np.testing.assert_allclose(p[0], [9.5, 19.0])  # the topmost point: half a pixel above the top pixel
    assert p[0, 0] == p[:, 0].min()
    assert signed_area(p) > 0 and p[1, 1] < p[0, 1]  # counter-clockwise on screen: leaves the top to the left


def test_signed_area_convention():
    # top-left, bottom-left, bottom-right, top-right: counter-clockwise on screen (rows down, cols right)
    ccw = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float)
    assert signed_area(ccw) == pytest.approx(1.0)
    assert signed_area(ccw[::-1]) == pytest.approx(-1.0)


def test_border_touching_mask_closes():
    m = disk((32, 32), (0, 15), 8)  # cut by the top edge
    p = outline_points(m, K)
    assert p[:, 0].min() == pytest.approx(-0.5)  # runs along the border, half a pixel outside
    assert signed_area(p) > 0
    assert dice(polygon_mask(p, m.shape), m) > 0.95


@pytest.mark.parametrize("mask", [disk((40, 40), (20, 20), 10), ellipse((48, 48), (24, 22), 7, 15)])
def test_polygon_mask_inverts_outline(mask):
    assert dice(polygon_mask(outline_points(mask, 64), mask.shape), mask) > 0.95


def test_largest_region_taken():
    m = disk((48, 48), (12, 12), 3) | disk((48, 48), (30, 32), 8)  # the small one is the most superior
    p = outline_points(m, K)
    np.testing.assert_allclose(p.mean(axis=0), [30, 32], atol=0.5)


def test_start_rule_square_diamond_and_rotations():
    sq = np.zeros((32, 32), dtype=bool)
    sq[10:20, 12:22] = True
    p = outline_points(sq, K)
    np.testing.assert_allclose(p[0], [9.5, 16.5], atol=1e-6)  # flat top: the middle, above the centroid
    assert p[1, 1] < p[0, 1] and p[1, 0] == pytest.approx(9.5)  # then left along the top (counter-clockwise)
    rr, cc = np.mgrid[:32, :32]
    diamond = np.abs(rr - 16) + np.abs(cc - 15) <= 6
    np.testing.assert_allclose(outline_points(diamond, K)[0], [9.5, 15.0])  # the top vertex
    ell = np.zeros((32, 32), dtype=bool)
    ell[6:24, 8:14] = True
    ell[18:24, 8:26] = True  # an L: no symmetry, so every rotation/flip starts elsewhere on the shape
    for m in (ell, np.rot90(ell), np.rot90(ell, 2), np.rot90(ell, 3), ell.T, ell[::-1]):
        p = outline_points(m, K)
        column = np.nonzero(m)[1].mean()  # the region's centroid column
        assert p[0, 1] == pytest.approx(column, abs=0.05)
        top = np.flatnonzero(m[:, int(round(column))])[0]
        assert p[0, 0] == pytest.approx(top - 0.5, abs=0.5)  # the topmost crossing of that vertical
        assert signed_area(p) > 0


def test_outlines_of_rasterised_ellipses_correspond_for_the_shape_model():
    """Point i lands on the same part of every outline: a PCA of rasterised ellipses needs two modes, as the exact
    ellipses do (a start that jumps with the rasterisation spreads the variance over many modes)."""
    rng = np.random.default_rng(3)
    outlines = [outline_points(ellipse((64, 64), (32 + rng.uniform(-3, 3), 32 + rng.uniform(-3, 3)),
                                       rng.uniform(7.5, 13.5), rng.uniform(12, 21)), 32) for _ in range(30)]
    model = ShapeModel.fit(np.stack(outlines))
    assert model.explained_variance_ratio[:2].sum() > 0.97  # measured 0.979; a flat top's leftmost start: 0.878


def test_outline_errors():
    with pytest.raises(ValueError, match="empty"):
        outline_points(np.zeros((8, 8)), K)
    with pytest.raises(ValueError, match="2-D"):
        outline_points(np.ones((2, 8, 8)), K)
    with pytest.raises(ValueError, match="k >= 3"):
        outline_points(np.ones((8, 8)), 2)


# ---- shape model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ellipses() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([ellipse_points(*rng.uniform(5, 15, 2), tuple(rng.uniform(10, 50, 2))) for _ in range(20)])


def test_pca_ellipses_two_modes(ellipses):
    sm = ShapeModel.fit(ellipses)
    assert sm.n_modes == 19 and sm.mean.shape == (K, 2) and sm.modes.shape == (19, K, 2)
    assert sm.explained_variance_ratio[:2].sum() > 0.99
    np.testing.assert_allclose(sm.mean.mean(axis=0), 0, atol=1e-9)  # centred at the origin


def test_pca_sample_shape_project(ellipses):
    sm = ShapeModel.fit(ellipses)
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(sm.sample(0, rng), sm.mean)
    s1, s2 = sm.sample(2, np.random.default_rng(7)), sm.sample(2, np.random.default_rng(7))
    np.testing.assert_array_equal(s1, s2)
    c = np.array([1.7, -0.6])
    np.testing.assert_allclose(sm.project(sm.shape(c) + [30.0, 12.0], 2), c, atol=1e-4)  # any centre
    c = np.random.default_rng(3).uniform(-2, 2, 2)
    drawn = sm.sample(2, np.random.default_rng(3))
    np.testing.assert_allclose(drawn, sm.shape(c), atol=1e-9)
    assert np.all(np.abs(sm.project(drawn, 2)) <= 2 + 1e-6)


def test_pca_residual(ellipses):
    sm = ShapeModel.fit(ellipses)
    assert sm.residual(ellipses[3], 2) < 1e-6
    sq = np.zeros((64, 64), dtype=bool)
    sq[22:42, 22:42] = True
    assert sm.residual(outline_points(sq, K), 2) > 1.0


def test_pca_state_roundtrip_and_errors(ellipses):
    sm = ShapeModel.fit(ellipses)
    back = ShapeModel.from_state(sm.state_dict())
    for key in ("mean", "modes", "sd"):
        np.testing.assert_array_equal(getattr(back, key), getattr(sm, key))
    with pytest.raises(ValueError, match="at least 2"):
        ShapeModel.fit(ellipses[:1])
    with pytest.raises(ValueError, match=r"\(N, k, 2\)"):
        ShapeModel.fit(ellipses[..., :1])
    with pytest.raises(ValueError, match="20 modes.*19"):
        sm.sample(20, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not match"):
        sm.project(ellipses[0, :-1], 2)
    with pytest.raises(ValueError, match="lacks"):
        ShapeModel.from_state({"mean": sm.mean})


# ---- TPS warp ---------------------------------------------------------------------------------------------------


def test_border_anchors():
    a = border_anchors((20, 30))
    assert a.shape == (28, 2) and len(np.unique(a, axis=0)) == 28
    assert a[:, 0].min() == 0 and a[:, 0].max() == 19 and a[:, 1].min() == 0 and a[:, 1].max() == 29


def test_warp_identity():
    img = np.random.default_rng(0).random((40, 36))
    p = ellipse_points(8, 11, (20, 18))
    np.testing.assert_allclose(tps_warp(img, p, p), img, atol=1e-5)


def test_warp_translation_exact():
    rng = np.random.default_rng(0)
    img = rng.random((40, 40))
    p = ellipse_points(8, 6, (20, 20)) + rng.normal(0, 0.5, (K, 2))
    out = tps_warp(img, p, p + [3, -2], anchors=False)
    np.testing.assert_allclose(out[3:, :-2], img[:-3, 2:], atol=1e-6)  # output (r, c) = input (r - 3, c + 2)
    rr, cc = np.mgrid[:40, :40].astype(float)
    ramp = 0.7 * rr + 0.3 * cc  # linear interpolation is exact on a ramp: a sub-pixel shift too
    out = tps_warp(ramp, p, p + [2.5, -1.25], anchors=False)
    np.testing.assert_allclose(out[4:-4, 4:-4], (ramp - 0.7 * 2.5 + 0.3 * 1.25)[4:-4, 4:-4], atol=1e-6)


def test_warp_disk_grows_to_target():
    m = disk((48, 48), (24, 24), 8)
    img = np.random.default_rng(0).random(m.shape)
    src = outline_points(m, K).astype(np.float64)
    tgt = 24 + (src - 24) * 11 / 8
    out, warped = warp_image_and_mask(img, m, src, tgt)
    assert warped.dtype == bool and out.shape == img.shape
    got = outline_points(warped, K)
    assert np.linalg.norm(got - tgt, axis=1).mean() < 0.7  # point for point: the start/orientation rule holds
    assert img.min() <= out.min() and out.max() <= img.max()  # linear interpolation: no overshoot


def test_warp_range_and_repeated_points():
    rng = np.random.default_rng(1)
    img = rng.random((32, 32)) * 5 - 2
    src = ellipse_points(7, 9, (16, 16))
    tgt = src + rng.normal(0, 1.0, src.shape)
    src, tgt = np.vstack([src, src[:3]]), np.vstack([tgt, tgt[:3]])  # repeated control points stay solvable
    out = tps_warp(img, src, tgt)
    assert np.isfinite(out).all() and img.min() <= out.min() and out.max() <= img.max()
    with pytest.raises(ValueError, match="of one shape"):
        tps_warp(img, src, tgt[:-1])
