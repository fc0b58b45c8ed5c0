"""torchrun, with one line instead of a traceback when it fails: `python -m job.launch ARGS` is
`torchrun ARGS`.

It runs torchrun's own `main` in this process, so the options, the PET_* variables, the rendezvous,
the signal handling (SIGTERM/SIGINT passed on to the workers, `--shutdown-timeout`) and the exit
code on success are torchrun's. When torchrun fails it raises an exception that Python would print
as a traceback after the job's own error line: a failed worker (`ChildFailedError`, with its
"Root Cause (first observed failure)" report), a signal to the launcher (`SignalException`) or a
rendezvous that timed out or could not connect. This prints one line for each of those instead and
exits 1, as torchrun does for any failure (the image's entry point then exits with the job's own
code, which the job wrote to JOB_EXIT_CODE_FILE). Any other exception keeps its traceback: it would
be a bug.
"""

from __future__ import annotations

import signal
import sys
from argparse import Namespace

from torch.distributed import DistError
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import get_rdzv_endpoint, main, parse_args

# What torchrun itself sends to the other workers of a node once one has failed.
STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGKILL)


def where(args: Namespace) -> str:
    """'node R of N' as torchrun's arguments (or its PET_* variables) say, or 'this node'."""
    return "this node" if args.standalone or args.nnodes == "1" else f"node {args.node_rank} of {args.nnodes}"


def logs(args: Namespace) -> str:
    """Where the workers' output went: this node's stderr, unless torchrun redirects it to files."""
    if args.redirects in (None, "", "0"):
        return "their output is above"
    folder = args.log_dir or "a torchelastic_* folder in the temporary directory"
    return f"their output is in {folder} (<run>/attempt_<n>/<local rank>/stderr.log)"


def how(failure: ProcessFailure) -> str:
    if failure.exitcode < 0:
        return f"was stopped by {failure.signal_name()}"
    return f"exited with code {failure.exitcode}"


def failed(error: ChildFailedError, args: Namespace) -> str:
    """The processes that failed by themselves first, then those torchrun stopped because of them."""
    failures = sorted(error.failures.items())
    first = [(rank, f) for rank, f in failures if f.exitcode not in STOP_SIGNALS] or failures
    then = [rank for rank, f in failures if (rank, f) not in first]
    said = ", ".join(f"rank {rank} (local rank {f.local_rank}, pid {f.pid}) {how(f)}" for rank, f in first)
    if then:
        said += f"; then torchrun stopped rank{'s' if len(then) > 1 else ''} " + ", ".join(map(str, then))
    return f"{said}; {logs(args)}"


def rendezvous_failed(error: Exception, args: Namespace) -> str:
    if args.standalone:
        endpoint = "on this machine"
    else:
        args.master_port = args.master_port or 29500  # as torchrun's run() does
        endpoint = f"at {get_rdzv_endpoint(args)}"
    said = (str(error).strip().splitlines() or [""])[0]
    return (f"the rendezvous {endpoint} failed ({type(error).__name__}: {said}); check that every node was "
            "started, within PET_RDZV_CONF's timeout, and can reach it")


def launch(argv: list[str]) -> int:
    try:
        main(argv)
        return 0
    except ChildFailedError as error:
        said = failed(error, parse_args(argv))
    except SignalException as error:
        said = f"got {error.sigval.name}: passed it on to the job's processes and waited for them (--shutdown-timeout)"
    except (RendezvousError, DistError) as error:
        said = rendezvous_failed(error, parse_args(argv))
    print(f"launcher: {where(parse_args(argv))}: {said}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.argv[0] = "torchrun"  # its usage and error messages name the command the user knows
    sys.exit(launch(sys.argv[1:]))
