"""Several nodes on one machine: each "node" is its own `bash entrypoint.sh ...` launch, started the way
the platform starts it, with its own HOME, JOB_CACHE_DIR, work folder and S3 endpoint (a counting
proxy in front of the one moto server), rendezvous over 127.0.0.1, gloo on the CPU, the tiny model.

- Kubeflow PyTorchJob: the environment the training operator (v1.7+) gives each pod (PET_NNODES,
  PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, PET_NPROC_PER_NODE, plus MASTER_ADDR/PORT,
  WORLD_SIZE, RANK, PYTHONUNBUFFERED) and the manifest's PET_RDZV_CONF (k8s/overlays/pytorchjob; not
  its JOB_NPROC=auto, which counts GPUs: PET_NPROC_PER_NODE decides); 2 nodes x 2 processes, then 4 x 1;
- SageMaker with instance_count=2: `entrypoint.sh train` with its own resourceconfig.json and
  hyperparameters.json under SM_ROOT;
- faults on 2 nodes: SIGTERM to one node (every node exits 75), SIGKILL of node 1 (node 0 exits 69
  at once, one line naming the lost peer), a rerun in which node 1 starts 30 s late and which resumes;
  a failed node's log has no traceback, only the job's lines and the launcher's one line (job/launch.py).

Each whole run checks: exit 0 on every node, one writer (node 0; the others only read), identical
replica digests on every process, and the base model's files fetched exactly once per node (GETs
counted by that node's proxy).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.faultproxy import FaultProxy
from tests.helpers import ROOT, SNLI_SAMPLE, job_env, read_run_file, s3_client
from tests.s3server import make_bucket

pytestmark = pytest.mark.slow

ENTRYPOINT = ROOT / "entrypoint.sh"
MAX_STEPS = 6
# Few steps of short sequences: 4 training processes share 2 cores in CI.
SETTINGS = {
    "data.eval_size": "8", "train.load_in_4bit": "false", "train.max_steps": str(MAX_STEPS),
    "train.checkpoint_every_steps": "2", "train.keep_checkpoints": "2", "train.logging_steps": "1",
    "train.background_upload": "false", "train.micro_batch_size": "2", "train.packing_length": "128",
    "train.max_seq_length": "128", "train.lora_r": "8",
    "merge.check_prompts": "1", "merge.dtype": "fp32",
    "evaluate.max_examples": "2", "evaluate.batch_size": "2", "evaluate.max_new_tokens": "4",
    "evaluate.compare_base": "false",
}
TRAIN_ONLY = ["--stages", "format,train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest_rendezvous_env() -> dict[str, str]:
    """PET_RDZV_CONF as the PyTorchJob manifest sets it: the rendezvous timeout that a node starting
    late relies on (the rest of the manifest's env is about the cluster: credentials, cache volume)."""
    doc = yaml.safe_load((ROOT / "k8s/overlays/pytorchjob/pytorchjob.yaml").read_text())
    container = doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e and e["name"] == "PET_RDZV_CONF"}


@pytest.fixture(scope="module")
def inputs(moto_server, tiny_model_dir):  # noqa: F811
    """A bucket with the data and the base model (the model is fetched from S3 by each node)."""
    bucket = make_bucket(moto_server)
    s3 = s3_client(moto_server)
    s3.upload_file(str(SNLI_SAMPLE), bucket, "inputs/snli.csv")
    model_keys = []
    for path in sorted(Path(tiny_model_dir).iterdir()):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"models/tiny/{path.name}")
            model_keys.append(f"models/tiny/{path.name}")
    return {"bucket": bucket, "endpoint": moto_server, "data": f"s3://{bucket}/inputs/snli.csv",
            "model": f"s3://{bucket}/models/tiny", "model_keys": model_keys}


class Node:
    """One machine of the job: its own folders and S3 endpoint (a proxy that counts its requests)."""

    def __init__(self, folder: Path, endpoint: str, env: dict[str, str]):
        self.folder = folder
        for name in ("home", "work", "tmp", "opt_ml"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        self.proxy = FaultProxy(endpoint).__enter__()
        venv_bin = str(Path(sys.executable).parent)
        self.env = job_env(self.proxy.url, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                           HOME=folder / "home", TMPDIR=folder / "tmp", JOB_CACHE_DIR=folder / "cache",
                           SM_ROOT=folder / "opt_ml", RUNPOD_WORKSPACE=folder / "no-workspace", OMP_NUM_THREADS=1,
                           JOB_SHUTDOWN_TIMEOUT=120, **env)
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str, prefix: tuple[str, ...] | list[str] = ()) -> Node:
        # The log goes to a file, not a pipe: a node whose pipe nobody reads would block on a full one.
        self.log = self.folder / f"log-{time.monotonic_ns()}.txt"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([*prefix, "bash", str(ENTRYPOINT), *args], cwd=self.folder / "work",
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, text=True)
        return self

    def wait_for(self, pattern: str, after: int = -1, timeout: float = 600) -> int:
        """The first number that `pattern`'s group captures in the node's log above `after` (e.g. a
        checkpoint's step), waiting for it: the run's own progress decides, not a sleep."""
        deadline = time.monotonic() + timeout
        while True:
            ended = self.proc.poll() is not None  # read the log after this, so nothing is missed
            numbers = [int(m.group(1)) for m in re.finditer(pattern, self.output) if int(m.group(1)) > after]
            if numbers:
                return numbers[0]
            if ended or time.monotonic() > deadline:
                raise AssertionError(f"no /{pattern}/ above {after} (exit {self.proc.returncode}):\n{self.output}")
            time.sleep(0.2)

    def finish(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[int]:
        """The entry point and every process under it (torchrun starts its workers in new sessions)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(parent, []).append(int(entry.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def gets(self, key: str) -> int:
        return self.proxy.requests[("GET", key)]

    def writes(self) -> list[tuple[str, str]]:
        return sorted(k for k in self.proxy.requests if k[0] in ("PUT", "POST", "DELETE"))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.proxy.__exit__()


@pytest.fixture
def make_nodes(tmp_path, inputs):
    made: list[Node] = []

    def make(envs: list[dict[str, str]]) -> list[Node]:
        # Fresh folders for every launch group: a node of another run must not find this one's cache.
        first = len(made)
        nodes = [Node(tmp_path / f"node{first + i}", inputs["endpoint"], env) for i, env in enumerate(envs)]
        made.extend(nodes)
        return nodes

    yield make
    for node in made:
        node.close()


def pytorchjob_envs(nodes: int, nproc: int) -> list[dict[str, str]]:
    """What the training operator sets in each replica's container (envvar.go, master.go; v1.7+):
    the Master is node 0, Worker i is node i+1. MASTER_ADDR is the master's Service name; here the
    one machine's address."""
    port = str(free_port())
    common = {"PYTHONUNBUFFERED": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
              "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port, "PET_NNODES": str(nodes),
              "PET_NPROC_PER_NODE": str(nproc), "WORLD_SIZE": str(nodes * nproc), **manifest_rendezvous_env()}
    return [{**common, "RANK": str(i), "PET_NODE_RANK": str(i)} for i in range(nodes)]


def run_args(inputs, root: str) -> list[str]:
    args = ["run", "--set", f"run_uri={root}", "--set", f"data.uri={inputs['data']}",
            "--set", f"model.uri={inputs['model']}"]
    for key, value in SETTINGS.items():
        args += ["--set", f"{key}={value}"]
    return args


def marker(inputs, root: str, stage: str) -> dict:
    return json.loads(read_run_file(root, inputs["endpoint"], f"_stages/{stage}.json"))


def check_whole_run(inputs, root: str, nodes: list[Node], processes: int, stages=("format", "train", "merge",
                                                                               "evaluate")) -> dict:
    """Every node exited 0; node 0 alone wrote; one replica digest; the model fetched once per node."""
    codes = [node.finish() for node in nodes]
    assert codes == [0] * len(nodes), "\n\n".join(f"node {i}: exit {c}\n{n.output[-4000:]}"
                                                  for i, (c, n) in enumerate(zip(codes, nodes)))
    for stage in stages:
        marker(inputs, root, stage)  # every stage finished
    metrics = marker(inputs, root, "train")["metrics"]
    assert metrics["processes"] == processes and metrics["steps"] == MAX_STEPS
    assert len(metrics["replica_digests"]) == processes and len(set(metrics["replica_digests"])) == 1, metrics
    # One writer: the lease, config.yaml, checkpoints and markers come from node 0 only.
    assert ("PUT", f"{root.split('/', 3)[3]}/_lease.json") in nodes[0].writes()
    for node in nodes[1:]:
        assert node.writes() == [], node.writes()
    # The base model: each file fetched once per node, by the node's first process.
    for i, node in enumerate(nodes):
        assert {key: node.gets(key) for key in inputs["model_keys"]} == dict.fromkeys(inputs["model_keys"], 1), i
    return metrics


def test_pytorchjob_two_nodes_of_two_processes_then_four_of_one(inputs, make_nodes):
    s3 = s3_client(inputs["endpoint"])
    losses = {}
    for shape, (n_nodes, nproc) in {"2x2": (2, 2), "4x1": (4, 1)}.items():
        root = f"s3://{inputs['bucket']}/runs/pytorchjob-{shape}"
        nodes = make_nodes(pytorchjob_envs(n_nodes, nproc))
        for node in nodes:
            node.start(*run_args(inputs, root), *([] if shape == "2x2" else TRAIN_ONLY))
        stages = ("format", "train", "merge", "evaluate") if shape == "2x2" else ("format", "train")
        metrics = check_whole_run(inputs, root, nodes, processes=4, stages=stages)
        losses[shape] = {e["step"]: e["loss"] for e in metrics["loss_curve"]}
        assert "multi-GPU: %d processes on this node, node 1 of %d" % (nproc, n_nodes) in nodes[1].output
        if shape == "2x2":  # the whole pipeline ran: the report is there
            s3.head_object(Bucket=inputs["bucket"], Key=f"runs/pytorchjob-{shape}/report/report.json")

    # One node of four processes on the same data and seed: the same loss curve as 2x2 and 4x1 (the
    # ranks, their shards and their seeds are the same; only the reduction order may differ).
    root = f"s3://{inputs['bucket']}/runs/one-node-4"
    (node,) = make_nodes([{"JOB_NPROC": "4"}])
    node.start(*run_args(inputs, root), *TRAIN_ONLY)
    assert node.finish() == 0, node.output[-4000:]
    single = {e["step"]: e["loss"] for e in marker(inputs, root, "train")["metrics"]["loss_curve"]}
    assert sorted(single) == list(range(1, MAX_STEPS + 1))
    for shape, curve in losses.items():
        assert curve == pytest.approx(single, rel=1e-4), (shape, curve, single)


def algo_hosts_wrapper(folder: Path) -> list[str]:
    """A command prefix under which SageMaker's host names (algo-1, algo-2) resolve to this machine:
    a private mount namespace with its own /etc/hosts (unshare; as root, or in a user namespace)."""
    hosts = folder / "hosts"
    hosts.write_text("127.0.0.1 localhost algo-1 algo-2\n")
    as_user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    wrapper = ["unshare", *as_user, "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    probe = subprocess.run([*wrapper, "getent", "hosts", "algo-2"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.startswith("127.0.0.1"):
        pytest.skip(f"cannot give the nodes SageMaker's host names (unshare/mount): {probe.stderr.strip()}")
    return wrapper


def test_sagemaker_two_instances(inputs, make_nodes, tmp_path):
    """`entrypoint.sh train` on algo-1 and algo-2, each with the files SageMaker writes on its instance."""
    root = f"s3://{inputs['bucket']}/runs/sagemaker"
    nodes = make_nodes([{}, {}])
    params = {"data.uri": inputs["data"], "model.uri": inputs["model"], **SETTINGS}
    port = str(free_port())
    wrapper = algo_hosts_wrapper(tmp_path)
    for i, node in enumerate(nodes):
        config = node.folder / "opt_ml/input/config"
        config.mkdir(parents=True)
        (config / "resourceconfig.json").write_text(json.dumps(
            {"current_host": f"algo-{i + 1}", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth0"}))
        (config / "hyperparameters.json").write_text(json.dumps(params))
        # The estimator's environment: an S3 run_uri (each instance's /opt/ml/checkpoints is its own).
        node.env.update(JOB_RUN_URI=root, JOB_NPROC="1", PET_MASTER_PORT=port)
        node.start("train", prefix=wrapper)
    check_whole_run(inputs, root, nodes, processes=2)
    assert "SageMaker: node 1 of 2, master algo-1" in nodes[1].output


def test_faults_sigterm_one_node_lost_node_late_node_and_resume(inputs, make_nodes):
    root = f"s3://{inputs['bucket']}/runs/faults"
    steps = 12
    nodes = make_nodes(pytorchjob_envs(2, 1))
    args = [*run_args(inputs, root), "--set", f"train.max_steps={steps}", *TRAIN_ONLY]

    def latest() -> int:
        return json.loads(read_run_file(root, inputs["endpoint"], "checkpoints/LATEST"))["step"]

    # 1. The platform stops node 1 only (SIGTERM to its entry point): every node saves the same
    # checkpoint and exits 75.
    for node in nodes:
        node.start(*args)
    nodes[0].wait_for(r"checkpoint (\d+) uploaded")
    nodes[1].proc.send_signal(signal.SIGTERM)
    codes = [node.finish() for node in nodes]
    assert codes == [75, 75], [node.output[-3000:] for node in nodes]
    stopped_at = latest()
    assert stopped_at < steps
    for node in nodes:
        assert "unexpected error" not in node.output and "Traceback" not in node.output, node.output
    # The launcher's one line: node 1's got the SIGTERM, node 0's saw its process exit 75 (torchrun's
    # own report of that, a ChildFailedError traceback, is not printed).
    assert "launcher: node 1 of 2: got SIGTERM: passed it on to the job's processes" in nodes[1].output
    assert re.search(r"launcher: node 0 of 2: rank 0 \(local rank 0, pid \d+\) exited with code 75; their output "
                     r"is above", nodes[0].output), nodes[0].output[-4000:]

    # 2. Rerun; node 1 is lost (every process of it SIGKILLed) after a later checkpoint: node 0 stops
    # at once with exit 69 and one line naming the peer it lost, instead of waiting for a timeout.
    for node in nodes:
        node.start(*args)
    killed_after = nodes[0].wait_for(r"checkpoint (\d+) uploaded", after=stopped_at)
    for pid in nodes[1].processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    lost_at = time.monotonic()
    assert nodes[0].finish(timeout=120) == 69, nodes[0].output[-4000:]
    waited = time.monotonic() - lost_at
    assert waited < 60, waited  # a connection closed by the peer is seen at once; 60 s for a loaded CI machine
    out = nodes[0].output
    lost = [line for line in out.splitlines() if "lost contact with peer" in line]
    assert lost and re.search(r"lost contact with peer 127\.0\.0\.1:\d+", lost[0]), out[-4000:]
    # The job's own error is that line, then the launcher's one line naming the process that failed:
    # no traceback, neither the job's nor torchrun's (its ChildFailedError report).
    assert "unexpected error" not in out and "Traceback" not in out and "ChildFailedError" not in out, out[-4000:]
    launcher = [line for line in out.splitlines() if line.startswith("launcher: ")]
    assert len(launcher) == 1 and re.fullmatch(r"launcher: node 0 of 2: rank 0 \(local rank 0, pid \d+\) exited "
                                               r"with code 69; their output is above", launcher[0]), out[-4000:]
    nodes[1].finish(timeout=60)

    # 3. Rerun with node 1 starting 30 s after node 0: node 0 waits at the rendezvous (PET_RDZV_CONF's
    # timeout, from the manifest), then both resume from the last checkpoint and finish.
    nodes[0].start(*args)
    time.sleep(30)
    assert nodes[0].proc.poll() is None, nodes[0].output
    nodes[1].start(*args)
    assert [node.finish() for node in nodes] == [0, 0], [node.output[-3000:] for node in nodes]
    metrics = marker(inputs, root, "train")["metrics"]
    assert metrics["steps"] == steps and metrics["resumed_from_step"] >= killed_after, metrics
    assert len(metrics["replica_digests"]) == 2 and len(set(metrics["replica_digests"])) == 1
    # Restarted in place (as Kubernetes restarts a failed container, its scratch volume kept): the
    # base model was fetched once per node over the three launches.
    for node in nodes:
        assert {key: node.gets(key) for key in inputs["model_keys"]} == dict.fromkeys(inputs["model_keys"], 1)
