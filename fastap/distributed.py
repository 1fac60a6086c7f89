"""The process group of ``torchrun``: joining it, collectives on Python objects, and stopping every
process when one of them fails.

Training (:mod:`fastap.training`), descriptor extraction (:mod:`fastap.extraction`) and
``fastap eval`` share these helpers; docs/distributed.md describes their use.

**Failure propagation.** A process that fails in a job run by several processes leaves the others
waiting in their next collective until the process group's timeout (30 minutes by default; NCCL
does not even notice a peer that died). :func:`propagate_failures` wraps a rank's part of the job:

- on the failing rank, the first failure of the job (an exception, a full disk, a
  KeyboardInterrupt) is recorded in the group's key-value store (the ``TCPStore`` that torchrun
  or ``init_process_group`` started) with the rank and a one-line cause, and pushed to one key
  per other rank; the error is then re-raised there as usual;
- on every other rank a watcher thread waits (blocked in the store, no polling) on its own key.
  When the report arrives it is kept, the rank's work stops at its next check
  (:func:`raise_if_peer_failed`, called between batches and before collectives) with
  :class:`PeerFailure` naming the failing rank and its cause, and on NCCL the group is aborted
  so that a collective already waiting returns. With gloo a waiting collective returns as soon as
  the failing process closes its group or exits; the error it raises is then replaced by the
  :class:`PeerFailure` that explains it.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import threading
import uuid
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ._device import resolve_device
from ._io import error_message

__all__ = [
    "DistributedContext",
    "MainRankError",
    "PeerFailure",
    "barrier",
    "broadcast_object",
    "failures_propagated",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "on_main",
    "propagate_failures",
    "raise_if_peer_failed",
    "rank",
    "use_group",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class DistributedContext:
    """What :func:`init_distributed` set up: ``rank``, ``world_size``, ``local_rank``,
    ``device`` and whether this process created the group (and should destroy it)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device,
                 owns_group: bool):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.owns_group = device, owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and is_distributed():
            dist.destroy_process_group()


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 1800.0,
                     *, name: str = "device") -> DistributedContext:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` in the environment), or run as a single process.

    ``device``: ``auto`` (CUDA if available), ``cpu`` or ``cuda``; with CUDA each process uses
    ``cuda:LOCAL_RANK``. ``backend``: ``auto`` = NCCL for CUDA, gloo for CPU. Many machines work
    the same way: ``torchrun --nnodes N --node_rank k --rdzv_endpoint host:port ...``. An
    already initialised group is reused (and not destroyed by ``close``). A device that does not
    exist here is a ValueError naming ``name``.
    """
    device = resolve_device(device, name).type
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if is_distributed():
        owns, size = False, dist.get_world_size()
    else:
        size = int(os.environ.get("WORLD_SIZE", 1))
        owns = size > 1
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if owns:
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistributedContext(rank(), world_size(), local_rank, dev, owns)


def use_group(distributed: Optional[bool]) -> bool:
    """Whether a job given ``distributed`` (``None``: when a group exists, ``True``: insist on
    one, ``False``: never) is split over the current process group of more than one process.
    The ``distributed`` argument of :func:`fastap.extraction.extract_descriptors` and
    :func:`fastap.retrieval.evaluate_model`."""
    if distributed is None:
        return is_distributed() and world_size() > 1
    if distributed and not is_distributed():
        raise ValueError("distributed=True needs an initialised torch.distributed process "
                         "group (run under torchrun, or call torch.distributed."
                         "init_process_group first)")
    return bool(distributed) and world_size() > 1


# ----------------------------------------------------------------------------------------------
# Collectives on Python objects
# ----------------------------------------------------------------------------------------------


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    raise_if_peer_failed()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    raise_if_peer_failed()
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Optional[DistributedContext] = None) -> None:
    if is_distributed():
        raise_if_peer_failed()
        if ctx is not None and ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


class PeerFailure(RuntimeError):
    """Raised on the other processes of a group when process ``rank`` failed inside
    :func:`propagate_failures`; ``cause`` is that process's error in one line."""

    def __init__(self, rank: int, what: str, cause: str):
        super().__init__(f"rank {rank} failed {what}: {cause}")
        self.rank, self.what, self.cause = rank, what, cause


class MainRankError(PeerFailure):
    """Raised on the other ranks when rank 0 fails in work that only it does (writing files)."""


def one_line(err: BaseException) -> str:
    """``err`` as one line: an OSError as ``<file>: <reason>``, an interrupt by name."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    text = " ".join((error_message(err) or "").split())
    return text or type(err).__name__


def on_main(ctx: Optional[DistributedContext], work: Callable[[], object], what: str):
    """Run ``work()`` on rank 0 only, as a collective (every rank calls it): a failure there
    raises on every rank, rank 0 its own error and the others :class:`MainRankError` with its
    message (``what`` says what rank 0 was doing, e.g. "writing a checkpoint"), instead of
    leaving them waiting in their next collective until the process group's timeout (NCCL does
    not notice a peer that died). Returns ``work()``'s value on rank 0, else None. ``ctx=None``:
    the current process group, if any."""
    me, size = (ctx.rank, ctx.world_size) if ctx is not None else (rank(), world_size())
    result, failure = None, None
    if me == 0:
        try:
            result = work()
        except Exception as err:  # shared, then re-raised below
            failure = err
    try:
        if size > 1:
            message = None if failure is None else one_line(failure)
            message = broadcast_object(message)
            if message is not None and me != 0:
                raise MainRankError(0, what, message)
    finally:
        if failure is not None:
            raise failure  # also when the broadcast itself failed: the cause comes first
    return result


# ----------------------------------------------------------------------------------------------
# Failure propagation
# ----------------------------------------------------------------------------------------------


_STOP = b"-"  # what a rank's own key receives when its part ended normally
#: One blocked read of the store (the watcher then reads again; c10d logs each expiry).
_WAIT = datetime.timedelta(days=1)
#: How long a rank whose collective broke waits for the report that explains it (the failing
#: rank files it before it closes its group, so it is normally there already).
_REPORT_GRACE_S = 5.0


class _Watch:
    """One job's failure channel: the keys ``fastap/failure/<job>/{first,rank<r>,received<r>}``
    of the group's store."""

    def __init__(self, what: str):
        self.what = what
        self.rank, self.size = rank(), world_size()
        job = broadcast_object(uuid.uuid4().hex if self.rank == 0 else None)
        self.prefix = f"fastap/failure/{job}"
        self.failure: Optional[PeerFailure] = None
        self.reported = threading.Event()
        self.thread: Optional[threading.Thread] = None
        try:
            # One connection per thread: a store client serialises its requests, and the
            # watcher's read stays blocked until a report or the stop marker arrives.
            base = dist.distributed_c10d._get_default_store()
            self.store, self.watch_store = base.clone(), base.clone()
            self.watch_store.set_timeout(_WAIT)
        except Exception:  # a store that cannot be shared: the job runs without propagation
            self.store = None
            return
        self.thread = threading.Thread(target=self._watch, name="fastap-failure-watch",
                                       daemon=True)
        self.thread.start()

    def _key(self, r: int) -> str:
        return f"{self.prefix}/rank{r}"

    def _watch(self) -> None:
        while True:
            try:
                value = self.watch_store.get(self._key(self.rank))
            except dist.DistStoreError as err:
                if "timeout" in str(err).lower():
                    continue
                return  # the store is gone (its host exited): collectives fail on their own
            except Exception:
                return
            if value == _STOP:
                return
            report = json.loads(value.decode())
            self.failure = PeerFailure(report["rank"], report["what"], report["cause"])
            self.reported.set()
            with contextlib.suppress(Exception):  # the failing rank waits for this (report())
                self.watch_store.set(f"{self.prefix}/received{self.rank}", b"1")
            _abort_nccl()
            return

    def report(self, err: BaseException) -> Optional[PeerFailure]:
        """File ``err`` as this job's failure, or return the peer's failure filed before it."""
        if self.failure is not None or self.store is None:
            return self.failure
        mine = json.dumps({"rank": self.rank, "what": self.what, "cause": one_line(err)})
        try:
            first = self.store.compare_set(f"{self.prefix}/first", "", mine).decode()
        except Exception:  # the store's host is gone; its report may have reached the watcher
            self.reported.wait(_REPORT_GRACE_S)
            return self.failure
        if first != mine:
            report = json.loads(first)
            return PeerFailure(report["rank"], report["what"], report["cause"])
        others = [r for r in range(self.size) if r != self.rank]
        with contextlib.suppress(Exception):
            for r in others:
                self.store.set(self._key(r), mine)
            # The store may live in this process (rank 0 without torchrun's agent): it must
            # not exit before the others have read the report. A bounded wait, not a poll.
            self.store.wait([f"{self.prefix}/received{r}" for r in others],
                            datetime.timedelta(seconds=_REPORT_GRACE_S))
        return None

    def stop(self) -> None:
        if self.thread is None:
            return
        with contextlib.suppress(Exception):
            self.store.set(self._key(self.rank), _STOP)
        self.thread.join(timeout=_REPORT_GRACE_S)


def _abort_nccl() -> None:
    """Make NCCL collectives already waiting for a failed peer return (gloo ones return when the
    peer's connection closes). torch's abort is experimental and for NCCL only."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None or not is_distributed() or dist.get_backend() != "nccl":
        return
    with contextlib.suppress(Exception):
        abort()


_watches: list[_Watch] = []


def raise_if_peer_failed() -> None:
    """Raise :class:`PeerFailure` when another process of the job reported a failure (a no-op
    outside :func:`propagate_failures`). Cheap: reads a flag the watcher thread set."""
    if _watches and _watches[-1].failure is not None:
        raise _watches[-1].failure


@contextlib.contextmanager
def propagate_failures(what: str) -> Iterator[None]:
    """Run a rank's part of a job so that a failure on any rank stops every rank promptly.

    Every rank of the current process group enters it together (its entry is a broadcast).
    ``what`` names the job in the message, e.g. ``"evaluating"``: the other ranks raise
    :class:`PeerFailure` ``"rank 1 failed evaluating: <cause>"``, the failing rank its own
    error. A no-op without a process group of more than one process, and inside another
    :func:`propagate_failures` (the outer one reports). See the module docstring for how.
    """
    if not is_distributed() or world_size() == 1 or _watches:
        yield
        return
    watch = _Watch(what)
    _watches.append(watch)
    try:
        yield
        raise_if_peer_failed()  # this rank finished, but the job failed elsewhere
    except PeerFailure:  # MainRankError included: the peer's failure, already explained
        raise
    except BaseException as err:
        if isinstance(err, GeneratorExit):
            raise
        # A collective that broke because a peer failed raises here too: that peer's report,
        # filed before it closed its group, tells what happened.
        peer = watch.report(err)
        if peer is not None:
            raise peer from err
        raise
    finally:
        _watches.pop()
        watch.stop()


def failures_propagated(what: str):
    """Decorator: the function runs inside :func:`propagate_failures` (``what``) when a group of
    more than one process is initialised, unless it is called with ``distributed=False``."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if kwargs.get("distributed") is False:
                return fn(*args, **kwargs)
            with propagate_failures(what):
                return fn(*args, **kwargs)
        return run
    return decorate
