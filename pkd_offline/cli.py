"""The command line: parses flags into a stage's dataclass config and calls the stage function.

Settings come from ``--params FILE`` (section ``--section``, by default the command's name) and
then from flags, which win. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pkd_offline.config import load_params, make_config
from pkd_offline.errors import PkdError
from pkd_offline.weights_source import OFFLINE_ENV, offline_mode

WEIGHTS = "a path or URL (https://, s3://, file://), URLs cached in $TORCH_HOME/hub/checkpoints"


def _common(parser: argparse.ArgumentParser, section: str) -> None:
    parser.add_argument("--params", type=Path, help="YAML file of settings (flags win)")
    parser.add_argument("--section", default=section, help=f"section of --params to read (default: {section})")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    parser.add_argument("--offline", action="store_true", help=f"weight URLs only from the cache, never the network "
                        f"(also {OFFLINE_ENV}=1)")


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action="store_const", const=True, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkd-offline", description="Offline PKD: distil object detectors against stored teacher FPN features.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make data sets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the synthetic COCO-format detection set")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--train", type=int)
    synth.add_argument("--val", type=int)
    synth.add_argument("--image-size", dest="image_size", type=int, help="long side, px")
    synth.add_argument("--seed", type=int)
    synth.add_argument("--params", type=Path)
    synth.add_argument("--section", default="synth")

    extract = commands.add_parser("extract", help="stage one: store the teacher's FPN features")
    _common(extract, "extract")
    extract.add_argument("--teacher")
    extract.add_argument("--checkpoint", help=f"teacher weights: {WEIGHTS}")
    _bool_flag(extract, "--random-init", "random teacher weights (seeded): smoke tests only")
    extract.add_argument("--variant", choices=("full", "tiny"))
    extract.add_argument("--data", type=Path)
    extract.add_argument("--split")
    extract.add_argument("--out", help="store path or fsspec URL (s3://bucket/features.zarr)")
    extract.add_argument("--format", dest="store_format", choices=("zarr", "wds"))
    extract.add_argument("--codec", help="fp32, fp16, int8 (the bits study's int6, int4, int2), or pca: "
                                          "decorrelated channels, --pca-step")
    extract.add_argument("--pca-step", dest="pca_step", type=float,
                         help="pca codec: rounding step of each component, in channel std units (default 0.1)")
    extract.add_argument("--views", type=int)
    extract.add_argument("--levels", help="pyramid levels to keep, e.g. 2,3,4,5 (P2 = stride 4)")
    extract.add_argument("--layout", choices=("full", "projected"),
                         help="projected: store each level as the PKD loss uses it at the paired student level")
    extract.add_argument("--student-levels", dest="student_levels",
                         help="with --layout projected: the student levels paired by index, e.g. 3,4,5,6")
    extract.add_argument("--short-side", dest="short_side", type=int)
    extract.add_argument("--max-size", dest="max_size", type=int)
    extract.add_argument("--batch-size", dest="batch_size", type=int)
    extract.add_argument("--workers", type=int)
    extract.add_argument("--device")
    extract.add_argument("--samples-per-shard", dest="samples_per_shard", type=int)
    extract.add_argument("--on-error", dest="on_error", choices=("stop", "skip"))
    _bool_flag(extract, "--with-images", "also store image bytes and boxes (WebDataset)")
    _bool_flag(extract, "--overwrite", "replace a store of another job at --out")
    extract.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False,
                         help="run the teacher on CUDA without graphs (by default one is captured per batch shape)")
    extract.add_argument("--seed", type=int)

    train = commands.add_parser("train", help="stage two: train a detector (plain, offline PKD or online PKD)")
    _common(train, "train")
    train.add_argument("--student", help="any detector name (teachers too)")
    train.add_argument("--backbone")
    train.add_argument("--backbone-weights", dest="backbone_weights",
                       help=f"ImageNet weights of the backbone (a torchvision classification state dict): {WEIGHTS}")
    train.add_argument("--variant", choices=("full", "tiny"))
    train.add_argument("--anchor-scale", dest="anchor_scale", type=float,
                       help="RetinaNet anchor side / stride at the first octave (default 4 full, 2 tiny)")
    train.add_argument("--head-norm", dest="head_norm", choices=("gn",), help="RetinaNet head GroupNorm (v2 head)")
    train.add_argument("--data", type=Path)
    train.add_argument("--split")
    train.add_argument("--val-split", dest="val_split")
    train.add_argument("--val-store", dest="val_store",
                       help="with --eval-every: read the val set from this store (path or URL) written by `extract "
                            "--split val --with-images`, not from --data")
    train.add_argument("--out", type=Path)
    train.add_argument("--epochs", type=int)
    train.add_argument("--iters", type=int)
    train.add_argument("--stop-after", dest="stop_after", type=int, help="end after N steps; --resume continues")
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--optimizer", choices=("sgd", "adamw"))
    train.add_argument("--lr", type=float)
    train.add_argument("--weight-decay", dest="weight_decay", type=float)
    train.add_argument("--warmup-iters", dest="warmup_iters", type=int)
    train.add_argument("--schedule", choices=("cosine", "step"))
    train.add_argument("--short-side", dest="short_side", type=int)
    train.add_argument("--max-size", dest="max_size", type=int)
    train.add_argument("--views", type=int)
    train.add_argument("--workers", type=int)
    train.add_argument("--device")
    train.add_argument("--seed", type=int)
    _bool_flag(train, "--resume", "continue from OUT/last.pt")
    train.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    train.add_argument("--eval-every", dest="eval_every", type=int)
    train.add_argument("--features", help="feature store path or fsspec URL: offline PKD")
    train.add_argument("--teacher", help="teacher name: online PKD (with --checkpoint)")
    train.add_argument("--checkpoint", dest="teacher_checkpoint", help=f"the online teacher's weights: {WEIGHTS}")
    _bool_flag(train, "--random-init", "random online-teacher weights: smoke tests only")
    _bool_flag(train, "--online-per-image", "run the online teacher per image at its own padded size (offline's maps)")
    train.add_argument("--alpha", type=float)
    train.add_argument("--level-map", dest="level_map", choices=("index", "stride"))
    train.add_argument("--max-pairs", dest="max_pairs", type=int)
    train.add_argument("--on-error", dest="on_error", choices=("stop", "skip"),
                       help="a damaged store sample: stop (default) or skip it and count it")

    evaluate = commands.add_parser("eval", help="COCO box AP of a checkpoint")
    _common(evaluate, "eval")
    evaluate.add_argument("--checkpoint", help=f"a model.pt: {WEIGHTS}")
    evaluate.add_argument("--data", type=Path)
    evaluate.add_argument("--split")
    evaluate.add_argument("--store", help="read the val set from this store (path or URL) written by `extract --split "
                          "val --with-images`, instead of --data")
    evaluate.add_argument("--out", type=Path, help="write the metrics JSON here")
    evaluate.add_argument("--device")
    evaluate.add_argument("--batch-size", dest="batch_size", type=int)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")

    inspect = commands.add_parser("inspect", help="a feature store's manifest, sizes and digest")
    inspect.add_argument("store")
    inspect.add_argument("--json", action="store_true")

    verify = commands.add_parser("verify", help="check a store's shards and recompute samples with its teacher")
    _common(verify, "verify")
    verify.add_argument("store")
    verify.add_argument("--data", type=Path)
    verify.add_argument("--checkpoint", help=f"the store's teacher weights: {WEIGHTS}")
    verify.add_argument("--samples", type=int)
    verify.add_argument("--device")
    verify.add_argument("--json", action="store_true")
    return parser


def _flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "params", "section", "json", "data_command")}


def run(args: argparse.Namespace) -> int:
    params = load_params(getattr(args, "params", None), getattr(args, "section", args.command))
    if args.command == "data":
        from stages.synth import SynthConfig, synth

        print(synth(make_config(SynthConfig, params, _flags(args))))
    elif args.command == "train":
        from stages.train import TrainConfig, train

        path = train(make_config(TrainConfig, params, _flags(args)))
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports the result
            print(path)
    elif args.command == "eval":
        from stages.evaluate import EvalConfig, evaluate

        stats = evaluate(make_config(EvalConfig, params, _flags(args)))
        print(json.dumps(stats) if args.json else "  ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    elif args.command == "extract":
        from stages.extract import ExtractConfig, extract

        path = extract(make_config(ExtractConfig, params, _flags(args)))
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports the result
            print(path)
    elif args.command == "inspect":
        from stages.inspect import inspect_store

        print(inspect_store(args.store, as_json=args.json))
    elif args.command == "verify":
        from stages.verify import VerifyConfig, verify

        report = verify(make_config(VerifyConfig, params, _flags(args)))
        print(json.dumps(report) if args.json else report["text"])
        return 0 if report["ok"] else 1
    return 0


def one_line(error: BaseException) -> str:
    """The error's message as one line (errors re-raised from DataLoader workers carry a traceback text)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    for prefix in ("pkd_offline.errors.PkdError: ", "storage.errors.StoreError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return lines[0] if len(lines) == 1 else last


def main(argv: list[str] | None = None) -> int:
    from storage.errors import StoreError
    from storage.files import close_object_store_sessions

    args = build_parser().parse_args(argv)
    try:
        with offline_mode(getattr(args, "offline", False)):
            return run(args)
    except (PkdError, StoreError) as error:
        print(f"pkd-offline: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pkd-offline: interrupted", file=sys.stderr)
        return 130
    finally:
        close_object_store_sessions()  # before exit, where s3fs's own close may not get the time


if __name__ == "__main__":
    sys.exit(main())
