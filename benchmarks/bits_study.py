"""How many bits PKD needs: bytes, fidelity and gradient agreement of teacher-map codecs.

    python -m benchmarks.bits_study STORE --student RUN/model.pt --data DATA_DIR
        [--batches 4 --batch-size 8 --fit-samples 32] [--json metrics/bits-study-cpu.json]
        [--plot plots/bits-study.png]

On an existing full-layout store (a projected one is refused) and a student trained against it, for
each operating point (the store codecs ``fp16``, ``int8``, ``int6``, ``int4``, ``int2`` and ``pca``,
uniform per-channel k-bit quantisation
for k = 6, 4, 2, and a prototype of the pca codec with other steps and byte layouts) it measures, per level:

- bytes after zstd (level 3, as the stores compress) over the float32 map's bytes;
- Pearson r between decoded and stored map, per sample and channel over the image's valid region,
  lowest and median;
- the gradient cosine: the cosine between the gradient of the project's PKD loss
  (``pkd_offline.engine.distillation_loss``) with respect to the trained student's FPN maps, computed
  with decoded teacher maps and with the stored maps, on the same batch (lowest and mean over batches).

"Exact" is the store as it is (an fp16 store's maps are exact fp16 values). The PCA prototype is a
measurement, not a store codec: it quantises as the pca codec does, with the store's basis and level
steps (``storage.pca_basis``: channels standardised, rotated onto the eigenvectors of their correlation
matrix, every component of a level rounded with one step in channel std units, coarser levels given
finer steps ``step * (finest stride / stride) ** power``), but at any base step and level power
(``--pca-steps``, ``--pca-level-power``), without the codec's two-byte limit on a code, and counts
its codes in the smaller of byte planes and bit planes. The basis is fitted on samples disjoint from
the measured ones; its bytes, spread over the store's samples, are counted.

Prints a table and ends with one JSON line (also written to ``--json``); ``--plot`` draws
``1 - grad cosine`` and ``1 - r`` (lowest) against bytes over fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from numcodecs import Zstd
from torch import Tensor

from pkd_offline.engine import Distillation, distillation_loss
from pkd_offline.errors import PkdError
from storage import CODECS, StoreError
from storage.codecs.pca import zigzag
from storage.pca_basis import (DEFAULT_STEP, LEVEL_POWER, LevelBasis, fit_level_basis, level_steps,
                               side_bytes)

ZSTD = Zstd(level=3)  # the stores' level (storage/zarr_store.py, storage/wds_store.py)
GRAD_COSINE_TARGET = 0.999

Coder = Callable[[np.ndarray, int], tuple[np.ndarray, int]]
"""(stored map float32 (C, H, W), stride px) -> (decoded float32 (C, H, W), bytes after zstd)."""


def zstd_bytes(values: np.ndarray) -> int:
    """Bytes of ``values``' raw buffer after zstd level 3 (0 for an empty array)."""
    return len(ZSTD.encode(np.ascontiguousarray(values).tobytes())) if values.size else 0


def unsigned_code_bytes(codes: np.ndarray) -> int:
    """Bytes after zstd of non-negative integer codes, the smaller of two layouts: byte planes (the codes'
    lowest bytes, then the next bytes, as many as the largest code needs) and bit planes (most significant
    first, packed)."""
    codes = np.asarray(codes, np.int64).ravel()
    if codes.size == 0:
        return 0
    bits = max(1, int(codes.max()).bit_length())
    byte_planes = [((codes >> (8 * k)) & 0xFF).astype(np.uint8) for k in range(math.ceil(bits / 8))]
    bit_planes = (codes[None, :] >> np.arange(bits - 1, -1, -1)[:, None]) & 1
    return min(zstd_bytes(np.concatenate(byte_planes)), zstd_bytes(np.packbits(bit_planes.astype(np.uint8).ravel())))


def store_codec(name: str) -> Coder:
    """A codec of ``storage.codecs.CODECS``: each part compressed with zstd, as a store holds it."""
    codec = CODECS[name]

    def code(values: np.ndarray, stride: int) -> tuple[np.ndarray, int]:
        parts = codec.encode(values)
        return codec.decode(parts), sum(zstd_bytes(part) for part in parts.values())
    return code


def store_pca(fit_maps: dict[int, list[np.ndarray]], step: float, amortise_over: int = 1) -> Coder:
    """The store's ``pca`` codec (``storage.pca_basis``: per-level basis fitted on ``fit_maps``, step ``step`` at the
    finest level): its parts compressed with zstd as a store holds them, the side file spread over
    ``amortise_over`` samples."""
    steps = level_steps(step, sorted(fit_maps))
    bases = {stride: fit_level_basis(maps, steps[stride]) for stride, maps in fit_maps.items()}
    side = math.ceil(len(side_bytes(bases)) / max(1, len(bases)) / amortise_over)

    def code(values: np.ndarray, stride: int) -> tuple[np.ndarray, int]:
        codec = CODECS["pca"].bound(bases[stride])
        parts = codec.encode(values)
        return codec.decode(parts), sum(zstd_bytes(part) for part in parts.values()) + side
    return code


def uniform_bits(bits: int) -> Coder:
    """Per-sample, per-channel uniform quantisation with ``bits`` bits between the channel's min and max:
    codes 0..2^bits-1, float32 scale and offset per channel (the int8 codec's scheme with fewer levels)."""
    top = 2**bits - 1

    def code(values: np.ndarray, stride: int) -> tuple[np.ndarray, int]:
        flat = values.reshape(values.shape[0], -1).astype(np.float64)
        low = flat.min(axis=1) if flat.size else np.zeros(values.shape[0])
        high = flat.max(axis=1) if flat.size else np.zeros(values.shape[0])
        scale, offset = ((high - low) / top).astype(np.float32), low.astype(np.float32)
        divisor = np.where(scale > 0, scale, 1).astype(np.float64)[:, None]
        codes = np.clip(np.rint((flat - offset[:, None]) / divisor), 0, top).astype(np.int64)
        decoded = (codes * scale[:, None].astype(np.float64) + offset[:, None]).astype(np.float32)
        size = unsigned_code_bytes(codes) + zstd_bytes(scale) + zstd_bytes(offset)
        return decoded.reshape(values.shape), size
    return code


def pca_codec(bases: dict[int, LevelBasis], steps: dict[int, float], amortise_over: int = 1) -> Coder:
    """The pca codec's quantiser (``LevelBasis.component_steps``) with the level's basis and its own step
    (``steps[stride]``, in channel std units), zigzag codes component by component, zstd (``unsigned_code_bytes``,
    no limit on a code's size). Bytes include the basis spread over ``amortise_over`` samples."""

    def code(values: np.ndarray, stride: int) -> tuple[np.ndarray, int]:
        basis = replace(bases[stride], step=steps[stride])
        codes = basis.component_steps(values)
        size = unsigned_code_bytes(zigzag(codes)) + math.ceil(basis.nbytes / amortise_over)
        return basis.features_from_steps(codes), size
    return code


def parse_pca_points(spec: str, default_power: float) -> list[tuple[str, float, float]]:
    """``"0.1,0.05@0"`` -> [(name, base step, level power)]: ``BASE`` uses ``default_power``, ``BASE@POWER``
    its own."""
    points = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        base, _, power = entry.partition("@")
        power_value = default_power if not power else float(power)
        name = f"pca {base}" + ("" if power_value == default_power else f" (level power {power_value:g})")
        points.append((name, float(base), power_value))
    return points


def channel_pearson(stored: np.ndarray, decoded: np.ndarray, valid_hw: tuple[int, int]) -> np.ndarray:
    """Pearson r per channel (C,) float64 between two (C, H, W) maps over the top-left ``valid_hw`` cells.
    NaN where the stored channel is constant there (r undefined); 0 where only the decoded one is."""
    h, w = valid_hw
    a = stored[:, :h, :w].reshape(stored.shape[0], -1).astype(np.float64)
    b = decoded[:, :h, :w].reshape(decoded.shape[0], -1).astype(np.float64)
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norm_a, norm_b = np.sqrt((a * a).sum(axis=1)), np.sqrt((b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / (norm_a * norm_b)
    r = np.where(norm_b == 0, 0.0, r)
    return np.where(norm_a == 0, np.nan, r)


def pkd_gradients(student_maps: dict[int, Tensor], batch: list[dict], distill: Distillation,
                  size_divisor: int) -> dict[int, Tensor]:
    """{student_stride: d loss / d map (N, C, h, w)} of ``distillation_loss`` (the training loss's PKD term)
    for fixed student maps and the batch's ``teacher_features``."""
    leaves = {s: m.detach().clone().requires_grad_(True) for s, m in student_maps.items()}
    images = [item["image"] for item in batch]
    loss = distillation_loss(leaves, batch, images, distill, size_divisor, torch.device("cpu"))
    paired = [s for s, _ in distill.pairs]
    return dict(zip(paired, torch.autograd.grad(loss, [leaves[s] for s in paired])))


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine between two tensors, flattened, in float64."""
    a, b = a.double().ravel(), b.double().ravel()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def with_teacher(batch: list[dict], maps: list[dict[int, np.ndarray]]) -> list[dict]:
    """Copies of the batch's items whose ``teacher_features`` are ``maps`` (one {stride: (C, h, w)} per item)."""
    return [{**item, "teacher_features": {s: torch.from_numpy(m) for s, m in item_maps.items()}}
            for item, item_maps in zip(batch, maps)]


def valid_cells(image_hw: tuple[int, int], stride: int) -> tuple[int, int]:
    return math.ceil(image_hw[0] / stride), math.ceil(image_hw[1] / stride)


def measure(coder: Coder, batches: list[list[dict]], student_maps: list[dict[int, Tensor]], distill: Distillation,
            size_divisor: int, exact_grads: list[dict[int, Tensor]]) -> dict:
    """One operating point on every batch: per teacher stride ``bytes_over_fp32``, ``r_lowest``, ``r_median``;
    per pair ``grad_cosine_lowest`` / ``grad_cosine_mean`` (keyed by teacher stride); totals."""
    coded_bytes: dict[int, int] = {}
    raw_bytes: dict[int, int] = {}
    r_values: dict[int, list[np.ndarray]] = {}
    cosines: dict[int, list[float]] = {t: [] for _, t in distill.pairs}
    all_cosines = []
    for batch, maps, exact in zip(batches, student_maps, exact_grads):
        decoded_batch = []
        for item in batch:
            decoded_item = {}
            for stride, stored in item["teacher_features"].items():
                stored = stored.numpy()
                decoded, size = coder(stored, stride)
                decoded_item[stride] = decoded
                coded_bytes[stride] = coded_bytes.get(stride, 0) + size
                raw_bytes[stride] = raw_bytes.get(stride, 0) + stored.size * 4
                r_values.setdefault(stride, []).append(
                    channel_pearson(stored, decoded, valid_cells(item["image_hw"], stride)))
            decoded_batch.append(decoded_item)
        grads = pkd_gradients(maps, with_teacher(batch, decoded_batch), distill, size_divisor)
        for s, t in distill.pairs:
            cosines[t].append(cosine(grads[s], exact[s]))
        paired = [s for s, _ in distill.pairs]
        all_cosines.append(cosine(torch.cat([grads[s].ravel() for s in paired]),
                                  torch.cat([exact[s].ravel() for s in paired])))
    r_all = {t: np.concatenate(v) for t, v in r_values.items()}
    return {
        "bytes_over_fp32": sum(coded_bytes.values()) / sum(raw_bytes.values()),
        "bytes_over_fp32_per_level": {t: coded_bytes[t] / raw_bytes[t] for t in sorted(raw_bytes)},
        "r_lowest": {t: float(np.nanmin(r)) for t, r in sorted(r_all.items())},
        "r_median": {t: float(np.nanmedian(r)) for t, r in sorted(r_all.items())},
        "grad_cosine_lowest": {t: min(v) for t, v in cosines.items()},
        "grad_cosine_mean": {t: float(np.mean(v)) for t, v in cosines.items()},
        "grad_cosine_all_lowest": min(all_cosines),
    }


def default_point(results: dict[str, dict]) -> str | None:
    """The operating point of fewest bytes whose lowest gradient cosine (every level, every batch) meets
    ``GRAD_COSINE_TARGET``; None if none does."""
    passing = [(r["bytes_over_fp32"], name) for name, r in results.items()
               if min(r["grad_cosine_lowest"].values()) >= GRAD_COSINE_TARGET]
    return min(passing)[1] if passing else None


def load_inputs(args: argparse.Namespace):
    """The student, the batches of (image, view) items joined with the store, the PCA fit maps, the pairing."""
    from pkd_offline.checkpoint import load_detector
    from pkd_offline.data import CocoDetection
    from pkd_offline.levels import pair_levels
    from pkd_offline.store_data import StoreJoinedDataset, store_views
    from pkd_offline.store_fit import check_store_fits, drop_images_the_store_skipped

    model, content = load_detector(args.student)
    model.eval()
    dataset = CocoDetection(args.data, content["config"].get("split", "train"), store_views(args.store))
    store = check_store_fits(args.store, dataset, model)
    drop_images_the_store_skipped(dataset, store.manifest)
    if store.manifest.layout["name"] != "full":
        raise PkdError(f"store {args.store} has the {store.manifest.layout['name']} layout: the study decodes full "
                       "teacher maps; extract one with --layout full")
    level_map = content["config"].get("level_map", "stride")
    pairs = pair_levels(list(model.strides), [level.stride for level in store.manifest.levels], level_map)
    distill = Distillation(pairs[: content["config"].get("max_pairs", 4)], float(content["config"].get("alpha", 6.0)))
    joined = StoreJoinedDataset(dataset, args.store)
    n_views, wanted = store.manifest.n_views, args.batches * args.batch_size
    spacing = max(2, len(dataset) // max(wanted, args.fit_samples))
    measured = [(i, k % n_views) for k, i in enumerate(range(0, len(dataset), spacing))][:wanted]
    fit = [(i, (k + 1) % n_views) for k, i in enumerate(range(spacing // 2, len(dataset), spacing))][: args.fit_samples]
    if len(measured) < wanted or len(fit) < args.fit_samples:
        raise PkdError(f"store {args.store} has {len(dataset)} images: too few for {args.batches} batches of "
                       f"{args.batch_size} and {args.fit_samples} disjoint fit samples")
    batches = [[joined[key] for key in measured[k: k + args.batch_size]] for k in range(0, wanted, args.batch_size)]
    fit_maps: dict[int, list[np.ndarray]] = {}
    for image_index, view_index in fit:
        sample = store.read(store.index_of(dataset.image_ids[image_index], view_index))
        for stride, values in sample.features.items():
            h, w = valid_cells(sample.image_hw, stride)
            fit_maps.setdefault(stride, []).append(np.asarray(values, np.float32)[:, :h, :w])
    return model, batches, fit_maps, distill, store.manifest, int(content["config"].get("size_divisor", 32))


def level_name(stride: int) -> str:
    return f"P{stride.bit_length() - 1}"


def table(results: dict[str, dict]) -> str:
    strides = list(next(iter(results.values()))["bytes_over_fp32_per_level"])
    paired = list(next(iter(results.values()))["grad_cosine_lowest"])
    names = " / ".join(level_name(s) for s in strides)
    pair_names = " / ".join(level_name(t) for t in paired)
    lines = [f"| point | bytes / fp32 (bits per value) | bytes / fp32 ({names}) | lowest r ({names}) | "
             f"median r ({names}) | grad cosine, lowest over batches (teacher {pair_names}) | all levels |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['bytes_over_fp32']:.4f} ({32 * r['bytes_over_fp32']:.2f}) | "
            + " / ".join(f"{v:.3f}" for v in r["bytes_over_fp32_per_level"].values()) + " | "
            + " / ".join(f"{v:.4f}" for v in r["r_lowest"].values()) + " | "
            + " / ".join(f"{v:.5f}" for v in r["r_median"].values()) + " | "
            + " / ".join(f"{v:.5f}" for v in r["grad_cosine_lowest"].values())
            + f" | {r['grad_cosine_all_lowest']:.5f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    """1 - lowest gradient cosine and 1 - lowest r (over levels) against bytes over fp32, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    floor = 1e-7  # fp16 of an fp16 store is exact: 1 - x is 0, drawn at the floor
    for key, label, marker in (("grad_cosine_lowest", "1 - grad cosine (lowest level and batch)", "o"),
                               ("r_lowest", "1 - Pearson r (lowest level, sample, channel)", "s")):
        x = [r["bytes_over_fp32"] for r in results.values()]
        y = [max(floor, 1 - min(r[key].values())) for r in results.values()]
        axis.scatter(x, y, marker=marker, label=label)
        if key == "grad_cosine_lowest":
            for name, xi, yi in zip(results, x, y):
                label_text = name + (" (exact: drawn at 1e-7)" if yi == floor else "")
                axis.annotate(label_text, (xi, yi), textcoords="offset points", xytext=(5, -9), fontsize=7)
    axis.axhline(1 - GRAD_COSINE_TARGET, color="grey", linestyle="--", linewidth=0.8, label="grad cosine 0.999")
    axis.set(xscale="log", yscale="log", xlim=(None, 1.5), xlabel="bytes after zstd / fp32 bytes",
             ylabel="1 - value (lower is better)", title="How many bits PKD needs (bits_study.py)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--student", required=True, help="model.pt of a student trained against the store")
    parser.add_argument("--data", type=Path, required=True, help="the data directory the store was extracted from")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fit-samples", type=int, default=32, help="samples the PCA basis is fitted on")
    parser.add_argument("--pca-steps", default="0.1,0.17,0.7,0.05@0",
                        help="PCA prototype points: finest level's step in channel std units, each BASE or BASE@POWER")
    parser.add_argument("--store-pca-step", type=float, default=DEFAULT_STEP, help="the store pca codec's --pca-step")
    parser.add_argument("--pca-level-power", type=float, default=LEVEL_POWER,
                        help="level step = BASE * (finest stride / stride) ** POWER (0: one step everywhere)")
    parser.add_argument("--json", type=Path, help="also write the JSON line here")
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    args = parser.parse_args()
    torch.manual_seed(0)
    try:
        model, batches, fit_maps, distill, manifest, size_divisor = load_inputs(args)
    except (PkdError, StoreError) as error:
        print(f"bits_study: {error}", file=sys.stderr)
        sys.exit(2)
    bases = {stride: fit_level_basis(maps, DEFAULT_STEP) for stride, maps in fit_maps.items()}  # steps: per point
    points: dict[str, Coder] = {name: store_codec(name) for name in ("fp16", "int8", "int6", "int4", "int2")}
    points.update({f"uniform {k}-bit": uniform_bits(k) for k in (6, 4, 2)})
    points["pca (store codec)"] = store_pca(fit_maps, args.store_pca_step, amortise_over=manifest.n_samples)
    points.update({name: pca_codec(bases, level_steps(base, list(bases), power), amortise_over=manifest.n_samples)
                   for name, base, power in parse_pca_points(args.pca_steps, args.pca_level_power)})
    with torch.no_grad():
        student_maps = [model.features([item["image"] for item in batch])[0] for batch in batches]
    exact_grads = [pkd_gradients(maps, batch, distill, size_divisor)
                   for maps, batch in zip(student_maps, batches)]
    results = {name: measure(coder, batches, student_maps, distill, size_divisor, exact_grads)
               for name, coder in points.items()}
    print(f"{args.store} (codec {manifest.codec}, {sum(len(b) for b in batches)} samples in {len(batches)} batches), "
          f"student {args.student}, pairs {distill.pairs}; PCA basis fitted on {len(next(iter(fit_maps.values())))} "
          "other samples")
    print(table(results))
    chosen = default_point(results)
    print(f"fewest bytes with grad cosine >= {GRAD_COSINE_TARGET} at every level and batch: {chosen}")
    if args.plot:
        plot(results, args.plot)
    line = json.dumps({"store": str(args.store), "store_codec": manifest.codec, "student": str(args.student),
                       "samples": sum(len(b) for b in batches), "batches": len(batches), "pairs": distill.pairs,
                       "fit_samples": len(next(iter(fit_maps.values()))), "grad_cosine_target": GRAD_COSINE_TARGET,
                       "default_by_grad_cosine": chosen, "points": results})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
