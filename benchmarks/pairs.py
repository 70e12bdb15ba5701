"""The teacher -> student pairs the benchmarks run, and the one place their stage configs are built.

``PAIRS["paper"]`` is the paper's headline pair at its sizes: Swin-S teacher P2..P5 stored in the projected layout
with the COCO recipe's codec (``params-coco.yaml``, the accuracy study's decision), RetinaNet-R50 student P3..P6 paired by index, 1333x800 px views, batch 2. ``PAIRS["tiny"]``
is the data path's stress case: Swin-T tiny, P2..P6 as full maps (int8), RetinaNet-R18 tiny, paired by stride.
A benchmark that runs a pair smaller (a CPU, ``--quick``) overrides sizes, never the pairing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from pkd_offline.config import to_plain
from stages.extract import ExtractConfig
from stages.synth import SynthConfig, synth
from stages.train import TrainConfig


@dataclass(frozen=True)
class Pair:
    """One pairing: teacher and student names, the teacher levels stored (pyramid level numbers, P2 = stride 4),
    the store's layout, codec and views, the student side, and the view sizes (px) and batch it runs at."""

    name: str
    teacher: str
    teacher_levels: str
    layout: str
    student_levels: str | None  # the student levels a projected store serves
    codec: str
    pca_step: float | None  # the pca codec's step (None: the extract default)
    views: int
    student: str
    backbone: str
    level_map: str
    variant: str
    short_side: int
    max_size: int
    batch_size: int


def coco_recipe_store() -> tuple[str, float | None]:
    """The stage-one codec of ``params-coco.yaml`` and its pca step (None: not a pca store, or the default): the
    accuracy study's ``codec_decision``."""
    recipe = Path(__file__).resolve().parents[1] / "params-coco.yaml"
    extract = yaml.safe_load(recipe.read_text())["extract_index"]
    return extract["codec"], extract.get("pca_step")


_RECIPE_CODEC, _RECIPE_PCA_STEP = coco_recipe_store()
PAIRS = {
    "paper": Pair(name="paper", teacher="swin_s", teacher_levels="2,3,4,5", layout="projected",
                  student_levels="3,4,5,6", codec=_RECIPE_CODEC, pca_step=_RECIPE_PCA_STEP, views=1,
                  student="retinanet", backbone="resnet50", level_map="index", variant="full", short_side=800,
                  max_size=1333, batch_size=2),
    "tiny": Pair(name="tiny", teacher="swin", teacher_levels="2,3,4,5,6", layout="full", student_levels=None,
                 codec="int8", pca_step=None, views=2, student="retinanet", backbone="resnet18", level_map="stride",
                 variant="tiny", short_side=192, max_size=192, batch_size=8),
}


def sized(pair: Pair, **sizes) -> Pair:
    """``pair`` at other sizes or settings (``variant``, ``short_side``, ``max_size``, ``batch_size``, ...)."""
    return dataclasses.replace(pair, **sizes)


def extract_config(pair: Pair, data: Path, out: Path | str, **settings) -> ExtractConfig:
    """Stage one for ``pair`` on ``data`` into ``out``: the pair's teacher, levels, layout, codec and views at its
    sizes, random-init teacher unless ``checkpoint`` is given, no progress bar, an existing store replaced.
    ``settings``: any other ``ExtractConfig`` field (``device``, ``workers``, ``batch_size``, ``store_format``...)."""
    values = dict(teacher=pair.teacher, random_init=settings.get("checkpoint") is None, variant=pair.variant,
                  data=Path(data), out=out, codec=pair.codec, views=pair.views, levels=pair.teacher_levels,
                  layout=pair.layout, student_levels=pair.student_levels, short_side=pair.short_side,
                  max_size=pair.max_size, progress=False, overwrite=True)
    if pair.pca_step is not None:
        values["pca_step"] = pair.pca_step
    values.update(settings)
    if values["layout"] != "projected":
        values["student_levels"] = None
    return ExtractConfig(**values)


def train_config(pair: Pair, data: Path, *, features: Path | str | None = None, online: bool = False,
                 **settings) -> TrainConfig:
    """Stage two for ``pair``: the student alone, offline from the store ``features``, or ``online`` (the pair's
    teacher, random init, in the loop). ``settings``: any other ``TrainConfig`` field."""
    mode = {"features": str(features)} if features is not None else (
        {"teacher": pair.teacher, "random_init": True} if online else {})
    return TrainConfig(student=pair.student, backbone=pair.backbone, variant=pair.variant, data=Path(data),
                       batch_size=pair.batch_size, level_map=pair.level_map, short_side=pair.short_side,
                       max_size=pair.max_size, views=pair.views, progress=False, **{**mode, **settings})


def synthetic_data(out: Path, images: int, image_size: int, *, seed: int = 0) -> Path:
    """The benchmarks' data: ``images`` synthetic training images of ``image_size`` px long side (and 2 val)."""
    return synth(SynthConfig(out=out, train=images, val=2, image_size=image_size, seed=seed))


def params_file(cfg, section: str, path: Path) -> Path:
    """``cfg`` written as section ``section`` of a params YAML file at ``path``, for ``pkd-offline ... --params``:
    a subprocess runs exactly the config built here."""
    path.write_text(yaml.safe_dump({section: to_plain(cfg)}, sort_keys=False))
    return path


def extract_command(cfg: ExtractConfig, work: Path, name: str) -> tuple[list[str], Path]:
    """(``pkd-offline`` arguments that run ``cfg``, the path its record JSON will be written to): the config as a
    params file in ``work`` and ``--record``, so the numbers come from the run's ``ExtractionResult``."""
    params = params_file(cfg, "extract", work / f"{name}.extract.yaml")
    record = work / f"{name}.record.json"
    return ["extract", "--params", str(params), "--record", str(record)], record
