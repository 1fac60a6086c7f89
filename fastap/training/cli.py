"""``fastap train``: the body of the subcommand declared in :mod:`fastap.cli`."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["run_train"]


def run_train(args: argparse.Namespace) -> int:
    """Load the recipe (or the checkpoint's config), apply overrides, train; 0 on success.

    Configuration and checkpoint problems print one ``fastap: error: ...`` line naming the key or
    file and return 2 (bad configuration) or 1 (files, checkpoints).
    """
    from .._io import error_message
    from .config import ConfigError, load_config
    from .distributed import PeerFailure
    from .trainer import CheckpointError, config_from_checkpoint, train

    try:
        if args.resume and args.resume_from:
            raise ConfigError("--resume and --resume-from exclude each other")
        if args.config is None:
            if args.resume_from is None:
                raise ConfigError("--config is required (unless --resume-from FILE gives the "
                                  "checkpoint's own configuration)")
            cfg = config_from_checkpoint(args.resume_from, args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        resume = args.resume_from if args.resume_from else (True if args.resume else None)
        final = train(cfg, resume=resume, progress=False if args.quiet else None)
    except ConfigError as err:
        print(f"fastap: error: {err}", file=sys.stderr)
        return 2
    # PeerFailure: another rank failed (MainRankError: rank 0, writing files); its cause.
    except (CheckpointError, PeerFailure, OSError) as err:
        print(f"fastap: error: {error_message(err)}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per torchrun process
        print(final)
    return 0
