"""The ``pca`` codec's side information: one channel basis per level, fitted once and kept in the store.

A level's :class:`LevelBasis` standardises each channel (``mean``, ``scale`` (C,), the channel's mean and
standard deviation over the fit maps), rotates onto the eigenvectors of the channels' correlation matrix
(``components`` (C, C), one column per component by decreasing variance) and rounds every component with one
``step`` (in channel standard deviations). Components far below the step round to zero and cost almost nothing
after zstd; a component of spread sigma costs about log2(sigma / step) bits (reverse water-filling).

The bases of a store live in one file, :data:`SIDE_NAME` (``np.savez``: plain arrays, read with
``allow_pickle=False``), written after the manifest and before the first shard; the manifest's ``codec_side``
holds the file's sha256, and a reader refuses a file whose hash, keys, shapes or values are wrong.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from storage.errors import StoreError

SIDE_NAME = "codec_side.npz"
DEFAULT_STEP = 0.1  # the finest level's step, in channel standard deviations
LEVEL_POWER = 0.5  # a level of stride s gets DEFAULT_STEP * (finest / s) ** LEVEL_POWER: coarse levels hold few values


@dataclass
class LevelBasis:
    """One level's decorrelation: ``mean``, ``scale`` float32 (C,); ``components`` float32 (C, C) (orthonormal
    columns by decreasing variance); ``step`` (float, channel std units); ``key``: names the basis where it came
    from a store's side file (its sha256 and the stride), so a device can keep its copy (empty: not kept)."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    step: float
    key: str = ""

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of its float32 arrays (mean, scale, components): the side information it adds to a store."""
        return 4 * (self.mean.size + self.scale.size + self.components.size)

    def component_steps(self, features: np.ndarray) -> np.ndarray:
        """Features (C, H, W) -> their components in steps (C, H, W) float64, integer valued: each channel
        standardised (``(x - mean) / scale``), rotated onto the components (``components^T``), divided by ``step``
        and rounded half to even; all in float64."""
        channels = features.shape[0]
        flat = np.asarray(features).reshape(channels, -1).astype(np.float64)
        standard = (flat - self.mean.astype(np.float64)[:, None]) / self.scale.astype(np.float64)[:, None]
        steps = np.rint(self.components.T.astype(np.float64) @ standard / self.step)
        return steps.reshape(np.shape(features))

    def features_from_steps(self, steps: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`component_steps` up to its rounding: steps (C, H, W) -> features float32 (C, H, W),
        rotated back and de-standardised in float64."""
        channels = steps.shape[0]
        standard = self.components.astype(np.float64) @ (np.asarray(steps).reshape(channels, -1) * self.step)
        flat = standard * self.scale.astype(np.float64)[:, None] + self.mean.astype(np.float64)[:, None]
        return flat.astype(np.float32).reshape(np.shape(steps))


def fit_level_basis(maps: list[np.ndarray], step: float) -> LevelBasis:
    """Fit a :class:`LevelBasis` on maps (C, h_i, w_i) of one level, every position of every map weighted once
    (``basis_from_moments`` of their float64 moments)."""
    count, total, gram = 0, 0.0, 0.0
    for m in maps:
        flat = np.asarray(m, np.float64).reshape(m.shape[0], -1)
        count, total, gram = count + flat.shape[1], total + flat.sum(axis=1), gram + flat @ flat.T
    return basis_from_moments(count, np.asarray(total), np.asarray(gram), step)


def basis_from_moments(count: int, total: np.ndarray, gram: np.ndarray, step: float) -> LevelBasis:
    """A :class:`LevelBasis` from a level's moments over ``count`` map positions: ``total`` (C,) the channels'
    sums, ``gram`` (C, C) the sums of their products (float64; extraction accumulates them on the teacher's device,
    batch by batch, without keeping the maps). Deterministic: each component's sign is fixed so its largest entry
    is positive. StoreError with fewer than two positions."""
    if count < 2:
        raise StoreError("the pca codec needs at least two map positions to fit its basis: extract more images")
    mean = total / count
    covariance = gram / count - np.outer(mean, mean)
    scale = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
    scale = np.where(scale > 0, scale, 1.0)
    variances, components = np.linalg.eigh(covariance / np.outer(scale, scale))
    components = components[:, np.argsort(variances)[::-1]]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
    components = components * np.where(signs == 0, 1.0, signs)
    return LevelBasis(mean.astype(np.float32), scale.astype(np.float32), components.astype(np.float32), float(step))


def level_steps(step: float, strides: list[int], power: float = LEVEL_POWER) -> dict[int, float]:
    """{stride: step * (finest / stride) ** power}: the coarse levels, a quarter of the values per octave and the
    same weight in the loss, get finer steps."""
    finest = min(strides)
    return {s: step * (finest / s) ** power for s in strides}


def side_bytes(bases: dict[int, LevelBasis]) -> bytes:
    """The side file's bytes for ``bases`` {stride: LevelBasis} (``np.savez``, no pickle)."""
    arrays = {}
    for stride, basis in sorted(bases.items()):
        arrays.update({f"s{stride}_mean": basis.mean, f"s{stride}_scale": basis.scale,
                       f"s{stride}_components": basis.components, f"s{stride}_step": np.array(basis.step, np.float64)})
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return buffer.getvalue()


def side_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_side(data: bytes, channels: dict[int, int], where: str) -> dict[int, LevelBasis]:
    """Parse and check side-file bytes against the store's levels {stride: channels}: every level present,
    float32 (C,), (C,) and (C, C) arrays, finite values, positive scales and step; StoreError otherwise."""
    def damaged(what: str) -> StoreError:
        return StoreError(f"{where}: {what}: the pca codec's basis is damaged; re-extract the store")

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # zipfile/numpy raise many types on damaged bytes
        raise damaged(f"not a readable .npz ({type(error).__name__})") from None
    expected = {f"s{s}_{part}" for s in channels for part in ("mean", "scale", "components", "step")}
    if set(arrays) != expected:
        raise damaged(f"holds {sorted(arrays)[:6]}, expected the arrays of strides {sorted(channels)}")
    bases, digest = {}, hashlib.sha256(data).hexdigest()
    for stride, c in channels.items():
        mean, scale, components, step = (arrays[f"s{stride}_{p}"] for p in ("mean", "scale", "components", "step"))
        shapes = [(mean, (c,)), (scale, (c,)), (components, (c, c))]
        if any(a.dtype != np.float32 or a.shape != shape for a, shape in shapes) or step.shape != ():
            raise damaged(f"stride {stride} arrays are {[(str(a.dtype), a.shape) for a, _ in shapes]}, expected "
                          f"float32 ({c},), ({c},), ({c}, {c})")
        if not all(np.isfinite(a).all() for a in (mean, scale, components, step)) or (scale <= 0).any() \
                or not float(step) > 0:
            raise damaged(f"stride {stride} holds non-finite values, a scale <= 0 or a step <= 0")
        bases[stride] = LevelBasis(mean, scale, components, float(step), key=f"{digest}/s{stride}")
    return bases
