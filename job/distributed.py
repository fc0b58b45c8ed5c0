"""Data-parallel runs: which process this is, and the few collective calls the job needs.

`torchrun --nproc-per-node N -m job run ...` and `accelerate launch -m job run ...` both start N
copies of the job with RANK, LOCAL_RANK and WORLD_SIZE in their environment. The copies split the
work like this:

- rank 0 (the main process) does every side effect: the lease, config.yaml, the format, merge and
  evaluate stages, checkpoint uploads, the adapter, markers and the report;
- every rank trains (one 4-bit model copy per GPU, DDP, each rank its own shard of the data);
- the other ranks wait for rank 0's word before training, and after it until rank 0 has finished
  (`RankProtocol`, below), so every process of a run ends with the same exit code: a multi-node
  launch that fails in merge restarts as a whole, instead of node 0 waiting alone at the rendezvous.

Everything here is a no-op in a plain single-process run, so the single-GPU path is unchanged.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from job.errors import JobError, MainProcessFailed, PeerLost

log = logging.getLogger("job")

# Rank 0's words to the other ranks (run this stage, stop) travel on a gloo group of their own with
# a long timeout: the others wait there through rank 0's merge and evaluate, which can take far
# longer than any collective call of training should be allowed to (train.distributed_timeout_minutes).
CONTROL_TIMEOUT = datetime.timedelta(hours=24)
_control_group = None


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process on its machine: downloads shared by the machine's processes happen here."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank})"


SINGLE = Ranks()


def ranks_from_env(environ=os.environ) -> Ranks:
    """The launcher's view of this process (torchrun and accelerate set the same three variables)."""
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    return Ranks(rank=int(environ["RANK"]), local_rank=int(environ.get("LOCAL_RANK", "0")), world_size=world)


def setup(timeout_minutes: float, environ=os.environ) -> Ranks:
    """Join the process group when launched by torchrun/accelerate: NCCL on GPUs, gloo on CPUs.

    The timeout bounds how long a rank waits in any collective call, which includes the waits for
    rank 0's format stage and for the model download before training starts: it must cover those.
    """
    ranks = ranks_from_env(environ)
    if not ranks.distributed:
        return ranks
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)  # one GPU per process, before NCCL starts
        dist.init_process_group(**group_options(ranks, timeout_minutes, torch.cuda.is_available()))
        log.info("distributed: %s, backend %s", ranks, dist.get_backend())
    global _control_group
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ranks


def group_options(ranks: Ranks, timeout_minutes: float, cuda: bool) -> dict:
    """init_process_group's arguments. On GPUs, NCCL with `device_id`: the process group is bound to
    this process's GPU at once (NCCL connects eagerly; without it the first collective call guesses
    the device, and PyTorch warns that a barrier may hang). On CPUs, gloo."""
    options = {"backend": "gloo", "timeout": datetime.timedelta(minutes=timeout_minutes)}
    if cuda:
        import torch

        options.update(backend="nccl", device_id=torch.device("cuda", ranks.local_rank))
    return options


# What gloo and NCCL say when the process at the other end of a connection is gone (killed, its
# machine lost, its network cut) or silent past the timeout: a RuntimeError (torch.distributed's
# DistError is one) naming the backend and one of these. Matched in the error and the errors it
# was raised from; a storage timeout or any other error is not one.
_BACKEND = re.compile(r"gloo|nccl|c10d|ProcessGroup|TCPStore", re.IGNORECASE)
_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|connection refused|timed out|timeout|"
                   r"remote process|socket closed|ncclRemoteError|ncclSystemError", re.IGNORECASE)
# gloo names the peer as [address]:port ("Connection closed by peer [10.0.3.7]:30645", "Read error
# [10.0.3.7]:30645: Connection reset by peer"); its source location "[.../pair.cc:553]" is no address.
_PEER_ADDRESS = re.compile(r"\[([0-9A-Za-z.:%-]+)\]:(\d+)")


def lost_peer(error: BaseException) -> Optional[str]:
    """When `error` says another process of the run is gone: that peer's address (when the message
    names it, as gloo's do) or a description; else None."""
    seen: Optional[BaseException] = error
    while seen is not None:
        text = str(seen)
        if isinstance(seen, RuntimeError) and (_is_dist_error(seen) or _BACKEND.search(text)) and _LOST.search(text):
            found = _PEER_ADDRESS.search(text)
            return f"{found.group(1)}:{found.group(2)}" if found else "(address not reported)"
        seen = seen.__cause__ or seen.__context__
    return None


def _is_dist_error(error: BaseException) -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(error, getattr(dist, "DistError", ()))


def peer_lost_error(ranks: Ranks, peer: str, error: BaseException) -> PeerLost:
    """The one-line message for a lost peer: which process noticed, which peer, what the backend said
    (its one sentence about it, without the source location), what to do."""
    said = type(error).__name__
    for sentence in re.split(r"(?<=\.)\s+|\n", str(error)):
        if _LOST.search(sentence):
            said = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", sentence.strip()).rstrip(".")
            break
    return PeerLost(f"{ranks}: lost contact with peer {peer} ({said[:200]}): a process of this multi-node run "
                    f"stopped, or its node was lost or cut off. Exit {PeerLost.exit_code}: rerun every node; "
                    "training resumes from the last uploaded checkpoint")


def _active() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def local_main_first(ranks: Ranks) -> Iterator[None]:
    """The body runs on each machine's first process, then on the others: for a download that the
    first one makes and the others find in the shared cache folder."""
    if not ranks.is_local_main:
        barrier()
    try:
        yield
    finally:
        if ranks.distributed and ranks.is_local_main:
            barrier()


def broadcast(obj=None, control: bool = False):
    """Rank 0's `obj`, on every rank (a picklable object; a blocking collective call). `control`: on
    the long-timeout gloo group, for waits as long as a whole stage of rank 0's."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group if control else None)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, obj)
    return boxes


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag: is it set on any rank? One small all-reduce, so every rank decides the same."""
    if not _active():
        return tuple(bool(f) for f in flags)
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def _control_broadcast(word=None):
    return broadcast(word, control=True)


class RankProtocol:
    """Rank 0's words to the other ranks of a multi-GPU run, as three verbs.

    - `wait(run)`: the other ranks wait here for rank 0's words: each "run this stage" word is handed
      to `run` (the stage then runs on this rank too), and the stop word ends the wait, with rank 0's
      exit code when rank 0 failed;
    - `all_ranks(word)`: rank 0, around a stage that every rank runs: the word goes out just before it
      starts. If the stage fails on rank 0, the others are inside the same stage and end with it (SIGTERM
      reaches every rank through the stop flag, or the launcher ends them): no stop word follows;
    - `ending()`: rank 0, around the whole pipeline: at the end, the stop word with rank 0's exit code.

    In a single process, all three do nothing. `send` is rank 0's broadcast on the control group (a
    test passes a fake one).
    """

    def __init__(self, ranks: Ranks, send: Callable = _control_broadcast):
        self.ranks = ranks
        self._send = send
        self._waiting = ranks.distributed and ranks.is_main  # rank 0's view: are the others waiting?

    def wait(self, run: Callable[[dict], None]) -> None:
        """Ranks other than 0: run the stages rank 0 announces, until it says stop."""
        if not self.ranks.distributed or self.ranks.is_main:
            return
        while True:
            word = self._send(None)
            if "exit_code" in word:
                if word["exit_code"]:
                    raise MainProcessFailed(word["message"], word["exit_code"])
                return
            run(word)

    @contextmanager
    def all_ranks(self, word: dict) -> Iterator[None]:
        """Rank 0: the body is a stage every rank runs; `word` tells the waiting ranks which one."""
        if not self._waiting:
            yield
            return
        self._send(word)
        try:
            yield
        except BaseException:
            self._waiting = False
            raise

    @contextmanager
    def ending(self) -> Iterator[None]:
        """Rank 0: when the body ends, the waiting ranks end too, with rank 0's exit code."""
        try:
            yield
        except BaseException as exc:
            self.release(exc)
            raise
        self.release()

    def release(self, error: Optional[BaseException] = None) -> None:
        """The stop word, once: exit code 0, or the failed run's (a JobError's own code, else 1)."""
        if not self._waiting:
            return
        self._waiting = False
        code = (error.exit_code if isinstance(error, JobError) else 1) if error is not None else 0
        self._send({"exit_code": code, "message": f"rank 0 stopped: {error}" if error is not None else ""})


def teardown() -> None:
    global _control_group
    if _active():
        import torch.distributed as dist

        dist.destroy_process_group()
        _control_group = None
