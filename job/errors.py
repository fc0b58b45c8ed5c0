"""The job's exceptions, each tied to one documented exit code (see README, "Exit codes")."""

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3
EXIT_LOCKED = 4  # another job holds this run's lease (job/lease.py)
EXIT_OUT_OF_MEMORY = 5  # the model or batch does not fit this machine's GPU or host memory (job/memory.py)
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE: a process of a multi-node run died or went silent; rerun every node
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after a checkpoint was uploaded; safe to rerun


class JobError(Exception):
    """An error the job expected: printed as one message (no traceback) and mapped to an exit code."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(JobError):
    """Bad configuration or input: the message names the file, row or key. Retrying cannot help."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class InputError(ConfigError):
    """Bad input data (CSV, model folder, tokenizer): same exit code as a bad configuration."""


class StorageError(JobError):
    """Missing bucket or object, access denied, or an endpoint that kept failing after retries."""

    exit_code = EXIT_STORAGE


class MissingObject(StorageError):
    """A file or object that is not there, in a folder or bucket that is: retrying cannot help, so it
    is bad input (exit 2) on every backend. A missing bucket, denied access or an unreachable
    endpoint stay StorageErrors (exit 3)."""

    exit_code = EXIT_BAD_INPUT


class Preempted(JobError):
    """SIGTERM arrived; a checkpoint was saved and uploaded, so a rerun continues from it."""

    exit_code = EXIT_PREEMPTED


class RunLocked(JobError):
    """Another job holds the run's lease (it writes this run_uri), or took it over from this one.

    The message names the run, the holder and when its lease expires, and what to do."""

    exit_code = EXIT_LOCKED


class OutOfMemory(JobError):
    """CUDA out of memory or a host MemoryError: the message names the stage, the memory seen and the
    setting to change. A rerun with the same settings on the same machine would fail the same way."""

    exit_code = EXIT_OUT_OF_MEMORY


class StaleStageError(ConfigError):
    """A stage's stored result was made with other settings; rerun with --force STAGE."""


class MainProcessFailed(JobError):
    """A multi-GPU run's rank 0 stopped with an error before or instead of training: the other ranks
    end with the same exit code, so whichever process a platform looks at tells the same story."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class PeerLost(JobError):
    """A multi-node run lost one of its processes (its node was killed, lost or cut off): every
    collective call fails, so this process stops too. Nothing is written that was not already safe:
    a rerun of every node resumes from the last uploaded checkpoint."""

    exit_code = EXIT_PEER_LOST
