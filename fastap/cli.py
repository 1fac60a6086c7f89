"""The ``fastap`` command line.

Each subcommand is an ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to the function running it; :func:`build_parser` lists them. A new subcommand is one
more pair of functions and one more line there.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

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
    p = subparsers.add_parser("info", help="versions, compiled kernels and visible GPUs",
                              description="Print the fastap and torch versions, whether the "
                                          "CUDA kernels were compiled, and the visible GPUs.")
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
    if gpu and not fastap.WITH_CUDA:
        print("note: a GPU is visible but fastap was built without CUDA kernels; rebuild on a "
              "machine with nvcc to use them", file=sys.stderr)
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fastap`` console script; returns the exit status.

    Errors that are the user's or the network's (a missing file, an unreachable URL, a corrupt
    archive) print one ``fastap: error: ...`` line on stderr and return 1 instead of a traceback.
    """
    from .download import DownloadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DownloadError, FileNotFoundError) as err:
        print(f"fastap: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
