"""Brain age from 3-D T1 MRI (Li et al., Neurocomputing 2020): the regression task under brain-age names."""

from __future__ import annotations

from collections.abc import Sequence

from medrobust.tasks.regression import RegressionTask


class BrainAgeTask(RegressionTask):
    """Age in years from brain MRI: :class:`RegressionTask` whose shift metrics are ``age_shift`` and
    ``age_shift_<band>``, whose bands are set by ``age_bands``, and whose standardisation defaults to the
    datamodule's ``age_mean`` / ``age_std`` (:class:`~medrobust.datamodules.brainage.BrainAgeDataModule`).

    Args:
        age_bands: band edges (years) for the per-band age shift; ``[15, 25, 50, 65]`` gives < 15, 15-25,
            25-50, 50-65 and > 65.
        **kwargs: :class:`RegressionTask`'s (``loss``, ``tau`` in years, ``target_mean``, ...).
    """

    shift_metric = "age_shift"  # robustness.csv rows, PNG names and the README figures use this name
    bands_key = "module.age_bands"
    datamodule_stats = ("age_mean", "age_std")

    def __init__(self, net, age_bands: Sequence[float] = (15, 25, 50, 65), **kwargs) -> None:
        super().__init__(net, bands=age_bands, **kwargs)
