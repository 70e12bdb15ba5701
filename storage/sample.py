"""One stored sample: the teacher's feature pyramid for one (image, view) pair."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """Teacher features of one image under one view.

    Attributes:
        index: sample index in the store, ``image_index * n_views + view_index``.
        image_id: the data set's image id (COCO ``id``).
        view_index: which of the manifest's views produced it.
        image_hw: valid (unpadded) image height and width in pixels after the view's resize.
        features: stride -> float32 array (C, H_s, W_s); each sample keeps its own map size,
            so sizes are ragged across samples.
        statistics: for the levels a projected layout projects, stride -> {"sum", "sum_sq"}: float64
            (C,) sums of the teacher map (and of its square) over the image's valid region.
        extras: optional raw members stored beside the features by the WebDataset format only
            (e.g. ``"jpg"`` image bytes, ``"boxes.json"``); the zarr format ignores them.
    """

    index: int
    image_id: int
    view_index: int
    image_hw: tuple[int, int]
    features: dict[int, np.ndarray]
    extras: dict[str, bytes] = field(default_factory=dict)
    statistics: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
