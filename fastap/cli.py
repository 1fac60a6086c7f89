"""The ``fastap`` command line.

Each subcommand is an ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to the function running it; :func:`build_parser` lists them. A new subcommand is one
more pair of functions and one more line there.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ._device import PRECISIONS
from ._io import error_message

__all__ = ["build_parser", "main"]


# ----------------------------------------------------------------------------------------------
# fastap download
# ----------------------------------------------------------------------------------------------


def _add_download(subparsers: argparse._SubParsersAction) -> None:
    from .download import DATASETS, MIRROR_ENV

    p = subparsers.add_parser(
        "download", help="download Revisited Oxford/Paris and the 1M distractors",
        description="Download datasets into the revisitop layout <root>/<dataset>/jpg/ "
                    "(+ gnd_<dataset>.pkl, or revisitop1m.txt). Interrupted downloads resume "
                    "and finished archives are skipped when the command is run again.")
    p.add_argument("datasets", nargs="+", choices=list(DATASETS), metavar="DATASET",
                   help=f"one or more of: {', '.join(DATASETS)}")
    p.add_argument("--root", required=True, help="folder that receives <root>/<dataset>/")
    p.add_argument("--mirror", default=None,
                   help=f"base URL replacing every upstream location (also ${MIRROR_ENV}); "
                        "files are fetched from <mirror>/<base name>/<path>")
    p.add_argument("--keep-archives", action="store_true",
                   help="keep the archives after extracting them")
    p.add_argument("--retries", type=int, default=3,
                   help="resume attempts after an interrupted transfer (default 3)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds without data before a connection counts as lost (default 60)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from .download import download

    folders = download(args.datasets, args.root, mirror=args.mirror,
                       keep_archives=args.keep_archives, progress=not args.quiet,
                       retries=args.retries, timeout=args.timeout)
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


# ----------------------------------------------------------------------------------------------
# fastap info
# ----------------------------------------------------------------------------------------------


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="versions, compiled kernels, GPUs and search precision",
                              description="Print the fastap and torch versions, whether the "
                                          "CUDA kernels were compiled, the visible GPUs, and "
                                          "which coarse pass the exact search uses here.")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import torch

    import fastap

    gpu = torch.cuda.is_available()
    print(f"fastap {fastap.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"CUDA kernels compiled: {'yes' if fastap.WITH_CUDA else 'no'}")
    if gpu:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"GPU visible: yes ({len(names)}: {', '.join(names)})")
    else:
        print("GPU visible: no")
    from fastap._device import cpu_bf16_units, cpu_int8_units, resolve_precision
    from fastap.search import search_precision

    print(f"CPU bfloat16 units: {cpu_bf16_units() or 'none'}; int8 dot-product units: "
          f"{cpu_int8_units() or 'none'}")
    ran, why = resolve_precision("auto", "cpu")
    print(f"CPU training and extraction (--precision auto): {ran} ({why})")
    path, why = search_precision("auto")
    print(f"float32 search coarse pass: {path} ({why}); every pass returns identical, "
          "certified results (docs/search.md)")
    if gpu and fastap.WITH_CUDA:
        path, why = search_precision("auto", device="cuda")
        print(f"float32 search coarse pass on cuda:0: {path} ({why}); the same certified "
              "results as the CPU")
    if gpu and not fastap.WITH_CUDA:
        print("note: a GPU is visible but fastap was built without CUDA kernels; rebuild on a "
              "machine with nvcc to use them", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# fastap eval
# ----------------------------------------------------------------------------------------------


def _count(lo: int):
    """An argparse type: an integer >= lo."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    return parse


def _alpha(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _scales(text: str) -> list[float]:
    """An argparse type: comma-separated positive scales."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,0.7071,0.5, got "
                                         f"{text!r}") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive numbers, got {text!r}")
    return values


def _whiten(text: str) -> str:
    """An argparse type: none, pca or learned:<file>."""
    kind, sep, file = text.partition(":")
    if text.lower() in ("none", "pca") or (kind.lower() == "learned" and sep and file):
        return text
    raise argparse.ArgumentTypeError(f"expected none, pca or learned:<file>, got {text!r}")


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    # One add_argument per option of fastap eval: long because the options are many.
    import os

    p = subparsers.add_parser(
        "eval", help="evaluate a model on Revisited Oxford/Paris (E/M/H mAP, mP@k)",
        description="Extract global descriptors of the cropped queries and the database, rank "
                    "the database by cosine similarity and report Easy/Medium/Hard mAP and "
                    "mP@1,5,10 (the revisitop protocol). Writes <output>/<dataset>.json, .txt "
                    "and _retrieval.png (the top 10 of a few queries, framed green/red/grey for "
                    "positive/negative/junk).")
    p.add_argument("--model", required=True,
                   help="a checkpoint file (layout detected), torchvision:<arch>[:<weights>] "
                        "(torchvision:resnet50 = ImageNet IMAGENET1K_V1), or <layout>:PATH with "
                        "layout moco, mocov3, dino, simclr, byol, torchvision or fastap")
    p.add_argument("--dataset", required=True, help="roxford5k or rparis6k (any folder of the "
                                                    "same layout works)")
    p.add_argument("--root", required=True, help="folder holding <root>/<dataset>/")
    p.add_argument("--arch", default="resnet50",
                   help="trunk of a foreign checkpoint (default resnet50); fastap checkpoints "
                        "restore their own")
    p.add_argument("--pooling", choices=["gem", "mac", "spoc"], default=None,
                   help="pooling of a foreign checkpoint (default gem; a fastap checkpoint "
                        "keeps its own)")
    p.add_argument("--max-size", type=_count(0), default=1024,
                   help="longest image side (default 1024; 0 = full resolution)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--multiscale", action="store_true", help="scales 1, 1/sqrt(2), 1/2")
    group.add_argument("--scales", type=_scales, default=None, help="e.g. 1,0.7071,0.5")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--batch-size", type=_count(1), default=1, help="images per batch (default 1)")
    p.add_argument("--workers", type=_count(0), default=min(4, os.cpu_count() or 1),
                   help="data-loading processes (default min(4, CPUs))")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 trunk on CUDA (default: on for CUDA)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the trunk's precision: auto (default: bf16 on a CPU with bfloat16 units, "
                        "avx512_bf16 or AMX, else fp32; CUDA: --amp decides), fp32 or bf16")
    p.add_argument("--distractors", action="store_true",
                   help="add the revisitop1m distractors (<root>/revisitop1m) to the database")
    p.add_argument("--features-dir", default=None,
                   help="cache of extracted descriptors per model, dataset, scales and max size; "
                        "reruns skip extraction")
    p.add_argument("--output", default="fastap-output/eval",
                   help="folder for the JSON, text and PNG results (default "
                        "./fastap-output/eval)")
    p.add_argument("--whiten", type=_whiten, default="none",
                   help="none (default), pca (PCA-whitening learned on the database "
                        "descriptors) or learned:<file> (a saved fastap.whitening.Whitening)")
    p.add_argument("--whiten-dim", type=_count(1), default=None,
                   help="keep this many whitened dimensions")
    p.add_argument("--qe", type=_count(0), default=0, help="alpha-QE with the top N (0 = off)")
    p.add_argument("--qe-alpha", type=_alpha, default=3.0, help="alpha of QE (default 3)")
    p.add_argument("--dba", type=_count(0), default=0,
                   help="database augmentation with N neighbours (0 = off)")
    p.add_argument("--dba-alpha", type=_alpha, default=3.0, help="alpha of DBA (default 3)")
    p.add_argument("--show-queries", type=_count(0), default=5,
                   help="queries shown in the PNG (default 5; 0 = no figure)")
    p.add_argument("--show-setup", choices=["easy", "medium", "hard"], default="medium",
                   help="setup whose labels frame the PNG's results (default medium)")
    p.add_argument("--save-scores", action="store_true",
                   help="also save the (queries x database) score matrix as .npy")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import os

    from .distributed import PeerFailure, init_distributed
    from .retrieval import evaluate_model, format_table

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    ctx, device = None, args.device
    try:
        # Under torchrun the processes share the extraction; rank 0 evaluates and writes.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            ctx = init_distributed(args.device or "auto", name="--device")
            device = ctx.device
        main = ctx is None or ctx.is_main
        quiet = args.quiet or not main
        result = evaluate_model(
            args.model, args.dataset, args.root, arch=args.arch, pooling=args.pooling,
            max_size=args.max_size or None, multiscale=args.multiscale, scales=args.scales,
            device=device, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
            precision=args.precision,
            distractors=args.distractors, features_dir=args.features_dir, whiten=args.whiten,
            whiten_dim=args.whiten_dim, qe=args.qe, qe_alpha=args.qe_alpha, dba=args.dba,
            dba_alpha=args.dba_alpha, output=args.output, show_queries=args.show_queries,
            show_setup=args.show_setup, save_scores=args.save_scores, progress=not args.quiet,
            log=(lambda msg: None) if quiet else log)
    # Bad model specs, checkpoints, missing files or no matplotlib: one line, no traceback.
    # Another process's failure: its rank and cause.
    except (ValueError, OSError, ImportError, PeerFailure) as err:
        print(f"fastap: error: {error_message(err)}", file=sys.stderr)
        return 1
    finally:
        if ctx is not None:
            ctx.close()  # also what ends the peers' wait in a collective (gloo) at once
    if main:  # one table per run, not per torchrun process
        print(format_table(result))
        if not quiet:
            for kind, path in result["files"].items():
                log(f"wrote {kind}: {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# fastap train
# ----------------------------------------------------------------------------------------------


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="contrastive pre-training or listwise-AP fine-tuning from a YAML recipe",
        description="Train from a YAML recipe (see configs/) with key.sub=value overrides, e.g. "
                    "`fastap train --config configs/mocov2_r50_ap_sfm120k.yaml optim.lr=1e-5 "
                    "output_dir=runs/x`. Several processes: `torchrun --nproc-per-node N "
                    "-m fastap.cli train ...`.")
    p.add_argument("--config", default=None,
                   help="YAML recipe (optional with --resume-from: the checkpoint's own config)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, value read as YAML (optim.lr=1e-4, train.amp=bfloat16)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir/checkpoints/")
    p.add_argument("--resume-from", default=None, metavar="FILE",
                   help="continue from this training checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .training.cli import run_train

    return run_train(args)


# ----------------------------------------------------------------------------------------------
# fastap demo
# ----------------------------------------------------------------------------------------------


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="the paper's comparison at small scale on an embedded synthetic benchmark",
        description="Generate a synthetic instance-retrieval benchmark (revisitop layout), then "
                    "train and evaluate three models on it: a supervised classifier's and a "
                    "contrastively pre-trained network's off-the-shelf features, and the "
                    "contrastive network fine-tuned with the AP loss. Prints E/M/H mAP and "
                    "mP@1,5,10 and writes report.json, report.txt, map.png, retrieval.png and "
                    "the models into --output. Needs no network.")
    p.add_argument("--output", default="fastap-demo", metavar="DIR",
                   help="output folder (default: ./fastap-demo)")
    p.add_argument("--quick", action="store_true",
                   help="the small preset (about a minute on two CPU cores)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the training")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, one per core)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="where the synthetic data go (default: OUTPUT/data; reused if present)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training and extraction precision: auto (default: bf16 on a CPU with "
                        "bfloat16 units, avx512_bf16 or AMX, or a GPU with bfloat16; else fp32), "
                        "fp32 or bf16")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        report = run_demo(args.output, quick=args.quick, seed=args.seed, device=args.device,
                          data_root=args.data_root, threads=args.threads,
                          precision=args.precision, progress=not args.quiet,
                          log=(lambda msg: None) if args.quiet else None)
    except (ValueError, OSError) as err:
        print(f"fastap: error: {error_message(err)}", file=sys.stderr)
        return 1
    print(report["table"])
    print(f"wrote {', '.join(report['files'].values())}")
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``fastap`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fastap",
        description="Listwise AP training and exact Revisited Oxford/Paris evaluation.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_download(subparsers)
    _add_info(subparsers)
    _add_eval(subparsers)
    _add_train(subparsers)
    _add_demo(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastap`` console script; returns the exit status.

    Errors that are the user's, the network's or the machine's (a missing file, an unreachable
    URL, a corrupt archive, a full disk, a file where a folder should be) print one
    ``fastap: error: ...`` line on stderr and return 1 instead of a traceback.
    """
    from .download import DownloadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DownloadError, OSError) as err:
        print(f"fastap: error: {error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
