"""HD95 cost: our batched torch port (``hd95_per_class``) vs MONAI's ``compute_hausdorff_distance``, in one run.

    python bench/bench_metrics.py [--repeats 9] [--threads 1]

Prints the time ratio ours / MONAI's (with the same empty-mask rules on both sides) and the largest difference
of the values on (1) a 2-D batch of 32 slices of 64 x 64 and (2) 4 volumes of 40^3, both with 4 foreground
classes of thin, irregular smoothed-noise tissue (like the brain phantom's cortex) and anisotropic spacing,
predictions a noisier copy of the labels. Timings alternate between the sides, median ratio over rounds.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from bench_attacks import ratio, timed_in_turns  # run as `python bench/bench_metrics.py`: bench/ is on the path
from monai.metrics import compute_hausdorff_distance

from medrobust.tasks.segmentation_metrics import hd95_per_class, image_diagonal, one_hot

CLASSES = 5  # background + 4 tissues


def labels_and_prediction(n: int, shape: tuple, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps ``(n, *shape)`` from smoothed noise, and a prediction: the same noise plus some more."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, CLASSES, *shape, generator=generator)
    pool = F.avg_pool2d if len(shape) == 2 else F.avg_pool3d
    smooth = lambda x: pool(pool(x, 5, 1, 2), 5, 1, 2)  # noqa: E731
    label = smooth(noise)
    pred = smooth(noise + 0.5 * torch.randn(noise.shape, generator=generator))
    return pred.argmax(1), label.argmax(1)


def monai_hd95(pred, label, spacing):
    """The previous implementation: MONAI per (sample, class) on the CPU, our empty-mask rules on top."""
    pred_hot, label_hot = one_hot(pred, CLASSES, False), one_hot(label, CLASSES, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distance = compute_hausdorff_distance(pred_hot, label_hot, include_background=True, percentile=95,
                                              spacing=spacing.tolist()).double()
    pred_empty, label_empty = pred_hot.flatten(2).sum(-1) == 0, label_hot.flatten(2).sum(-1) == 0
    diagonal = image_diagonal(tuple(pred.shape[1:]), spacing, pred.shape[0])[:, None].expand_as(distance)
    distance = torch.where(pred_empty ^ label_empty, diagonal, distance)
    return torch.where(pred_empty & label_empty, torch.zeros_like(distance), distance)


def compare(name: str, n: int, shape: tuple, repeats: int) -> None:
    pred, label = labels_and_prediction(n, shape)
    spacing = torch.tensor([1.2, 0.8, 2.0][: len(shape)]).expand(n, len(shape))
    times, results = timed_in_turns({"ours": lambda: hd95_per_class(pred, label, CLASSES, spacing=spacing),
                                     "monai": lambda: monai_hd95(pred, label, spacing)}, repeats)
    difference = (results["ours"] - results["monai"]).abs().max().item()
    print(f"{name}: HD95 time ours / MONAI = {ratio(times, 'ours', 'monai'):.3f} "
          f"(median ours {sorted(times['ours'])[repeats // 2]:.3f} s, MONAI {sorted(times['monai'])[repeats // 2]:.3f} s), "
          f"max |difference| {difference:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds; each ratio is the median over them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compare("2-D, 32 x 64^2, 4 classes", 32, (64, 64), args.repeats)
    compare("3-D, 4 x 40^3, 4 classes", 4, (40, 40, 40), args.repeats)


if __name__ == "__main__":
    main()
