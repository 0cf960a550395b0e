"""What a landmark dataset holds, known before it is built: the configs size the network and name the metrics with it
(``${landmarks:<what>,${data}}``, registered in :mod:`medrobust.resolvers`). The phantom's and ISBI 2015's landmarks
are fixed; fcsv reads the first markups file of the subjects table, as
:class:`~medrobust.datamodules.landmarks.LandmarkDataModule` does."""

from __future__ import annotations

from collections.abc import Sequence

from medrobust.data import afids_phantom, landmark_formats
from medrobust.datamodules.landmarks import SOURCE_DIMS, SOURCES

WHAT = ("dims", "names", "count", "coordinates")


def landmark_info(what: str, source: str = "phantom", spatial_dims: int | None = None, csv: str | None = None,
                  root: str | None = None, landmark_names: Sequence[str] | None = None):
    """``dims`` (spatial dimensions), ``names`` (one per landmark), ``count`` (``K``) or ``coordinates``
    (``K * D``: a coordinate regressor's outputs) of the data ``source`` with these data settings."""
    if what not in WHAT:
        raise ValueError(f"${{landmarks:...}} asks for one of {list(WHAT)}, got {what!r}")
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {list(SOURCES)}, got {source!r}")
    dims = SOURCE_DIMS.get(source, 2) if spatial_dims is None else int(spatial_dims)
    if what == "dims":
        return dims
    if source == "phantom":
        names = afids_phantom.load_fiducials(midline_only=dims == 2).names
    elif source == "isbi2015":
        names = landmark_formats.ISBI_NAMES
    elif landmark_names is not None:
        names = list(landmark_names)
    else:
        if csv is None:
            raise ValueError("data.csv: source=fcsv needs the subjects table (columns image, markups[, split])")
        first = landmark_formats.read_markups_table(csv, root)[0]["markups"]
        names = landmark_formats.read_fcsv(first)[0]
    names = [str(name) for name in names]
    return {"names": names, "count": len(names), "coordinates": len(names) * dims}[what]
