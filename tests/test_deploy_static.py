"""The deployment files say what the issue asks of them: the rendered Kubernetes manifests, the
Dockerfile, and the Terraform module. Offline and fast; .ci/lint runs the linters and checkov too.

Rendering uses kubectl when it is installed, else scripts/render_k8s.py's own renderer; the
Terraform checks need python-hcl2 (installed by .ci/lint) and are skipped without it.

The PyTorchJob (k8s/overlays/pytorchjob) is a custom resource: .ci/lint validates its replica pods
as v1 Pods (kubernetes-validate, strict) and its field names and types against the training
operator SDK's models (scripts/k8s_crd.py; the SDK test here is skipped where kubeflow-training is
not installed). What the operator's webhook and controller require beyond that, and what this job
relies on (restart policy, nprocPerNode, the same pod as the base Job), is only asserted here,
structurally.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import k8s_crd  # noqa: E402
import render_k8s  # noqa: E402

# Kustomizations whose workload is the batch Job, and all of them (the last replaces it by a PyTorchJob).
OVERLAYS = ["base", "overlays/minio", "overlays/multi-gpu", "overlays/multi-node-indexed"]
ALL_KUSTOMIZATIONS = OVERLAYS + ["overlays/pytorchjob"]
GPUS = {"base": 1, "overlays/minio": 1, "overlays/multi-gpu": 8, "overlays/multi-node-indexed": 8}


def render(name: str) -> dict:
    text = (render_k8s.render_with_kubectl if shutil.which("kubectl") else render_k8s.render_in_python)(
        ROOT / "k8s" / name)

    def key(d):  # a ConfigMap's name carries kustomize's content hash suffix: drop it
        name = d["metadata"]["name"]
        return d["kind"], name.rsplit("-", 1)[0] if d["kind"] == "ConfigMap" else name

    return {key(d): d for d in yaml.safe_load_all(text) if d}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


def job_of(docs):
    return docs[("Job", "qlora-job")]


# -- Kubernetes ----------------------------------------------------------------------------------


def test_pod_failure_policy(rendered):
    _, docs = rendered
    spec = job_of(docs)["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["backoffLimit"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    by_action = {}
    for rule in rules:
        by_action.setdefault(rule["action"], []).append(rule)
    assert [r["onExitCodes"]["values"] for r in by_action["FailJob"]] == [[2, 5]]  # bad input, out of memory
    ignored = by_action["Ignore"]
    assert [75] in [r["onExitCodes"]["values"] for r in ignored if "onExitCodes" in r]
    assert {"type": "DisruptionTarget", "status": "True"} in [c for r in ignored for c in r.get("onPodConditions", [])]
    assert all(r["onExitCodes"]["containerName"] == "job" for r in rules if "onExitCodes" in r)
    # Exit 4 (run locked by another job's lease) has no rule: an ordinary failure, with backoff.
    assert all(4 not in r["onExitCodes"]["values"] for r in rules if "onExitCodes" in r)


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_gpus_and_scheduling(rendered):
    name, docs = rendered
    pod = job_of(docs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == GPUS[name]
    # Several GPUs: the entry point starts one process per visible GPU (torchrun).
    assert env_of(container).get("JOB_NPROC") == ("auto" if GPUS[name] > 1 else None)
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # Long enough to finish a step and upload a checkpoint after SIGTERM.
    assert pod["terminationGracePeriodSeconds"] >= 300


def test_security_context_and_writable_volumes(rendered):
    _, docs = rendered
    pod = job_of(docs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["privileged"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # Everything the job writes with a read-only root: HOME (caches), /tmp, scratch, /dev/shm.
    for path in ("/home/job", "/tmp", "/scratch", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]], path
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert pod["automountServiceAccountToken"] is False


def test_config_map_is_mounted_and_is_a_valid_job_config(rendered, tmp_path):
    name, docs = rendered
    pod = job_of(docs)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_map = docs[("ConfigMap", "qlora-job-config")]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert container["args"] == ["run", "--config", f"{mount['mountPath']}/config.yaml"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    if name == "overlays/minio":
        assert config["storage"]["endpoint_url"].startswith("http")
    config_job = pytest.importorskip("job.config")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    cfg = config_job.load_config(str(path), environ={})
    assert cfg.run_uri.startswith("s3://")


def test_credentials_irsa_in_base_secret_in_minio():
    base, minio = render("base"), render("overlays/minio")
    annotation = "eks.amazonaws.com/role-arn"
    assert base[("ServiceAccount", "qlora-job")]["metadata"]["annotations"][annotation].startswith("arn:aws:iam::")
    assert annotation not in minio[("ServiceAccount", "qlora-job")]["metadata"].get("annotations", {})
    for docs in (base, minio):
        pod = job_of(docs)["spec"]["template"]["spec"]
        secret = next(v["secret"] for v in pod["volumes"] if "secret" in v)
        assert secret["optional"] is True  # IRSA needs no Secret
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["AWS_SHARED_CREDENTIALS_FILE"].startswith("/var/run/secrets/")
    egress_ports = {p["port"] for rule in minio[("NetworkPolicy", "qlora-job")]["spec"]["egress"]
                    for p in rule["ports"]}
    assert {53, 443, 9000} <= egress_ports


@pytest.mark.skipif(not shutil.which("kubectl"), reason="needs kubectl to compare against")
@pytest.mark.parametrize("name", ALL_KUSTOMIZATIONS)
def test_python_renderer_matches_kubectl(name):
    def normal(text):
        docs = []
        for doc in yaml.safe_load_all(text):
            text = yaml.safe_dump(doc, sort_keys=True)
            docs.append(re.sub(r"qlora-job-config-[a-z0-9]+", "qlora-job-config-HASH", text))
        return sorted(docs)

    path = ROOT / "k8s" / name
    assert normal(render_k8s.render_in_python(path)) == normal(render_k8s.render_with_kubectl(path))


# -- Several GPUs and nodes -----------------------------------------------------------------------


def _without(mapping: dict, *keys) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


def _memory_gi(quantity: str) -> float:
    assert quantity.endswith("Gi"), quantity
    return float(quantity[:-2])


def test_multi_gpu_changes_only_resources_and_process_count():
    base, multi = job_of(render("base")), job_of(render("overlays/multi-gpu"))
    # Every Job-level policy is the base's: podFailurePolicy, backoffLimit, TTL, completion mode.
    assert _without(multi["spec"], "template") == _without(base["spec"], "template")
    base_pod, pod = base["spec"]["template"]["spec"], multi["spec"]["template"]["spec"]
    assert _without(pod, "containers", "volumes") == _without(base_pod, "containers", "volumes")
    (base_container,), (container,) = base_pod["containers"], pod["containers"]
    assert _without(container, "resources", "env") == _without(base_container, "resources", "env")
    assert container["env"] == base_container["env"] + [{"name": "JOB_NPROC", "value": "auto"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    base_volumes = {v["name"]: v for v in base_pod["volumes"]}
    assert _without(volumes, "dshm") == _without(base_volumes, "dshm")
    # Scaled with the processes, and consistent: requests within limits, /dev/shm (memory) within
    # the memory limit, never less than one GPU's share.
    res, base_res = container["resources"], base_container["resources"]
    for kind in ("requests", "limits"):
        assert int(res[kind]["cpu"]) >= int(base_res[kind]["cpu"])
        assert _memory_gi(res[kind]["memory"]) >= _memory_gi(base_res[kind]["memory"])
    assert int(res["requests"]["cpu"]) <= int(res["limits"]["cpu"])
    assert _memory_gi(res["requests"]["memory"]) <= _memory_gi(res["limits"]["memory"])
    shm = _memory_gi(volumes["dshm"]["emptyDir"]["sizeLimit"])
    assert _memory_gi(base_volumes["dshm"]["emptyDir"]["sizeLimit"]) <= shm < _memory_gi(res["limits"]["memory"]) / 2


def _peer_policy(docs, label):
    """The NetworkPolicy letting the run's own pods (selected by `label`) reach each other."""
    policy = docs[("NetworkPolicy", "qlora-job-peers")]["spec"]
    peers = {"podSelector": {"matchLabels": {label: "qlora-job"}}}
    assert policy["podSelector"] == peers["podSelector"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # Any port (NCCL uses ephemeral ones), from and to the same pods only.
    assert policy["ingress"] == [{"from": [peers]}] and policy["egress"] == [{"to": [peers]}]
    # The base's policy is still there, unchanged: nothing else may reach the pods.
    assert docs[("NetworkPolicy", "qlora-job")] == render("base")[("NetworkPolicy", "qlora-job")]


def test_multi_node_indexed_job():
    docs = render("overlays/multi-node-indexed")
    job, base = job_of(docs), job_of(render("overlays/multi-gpu"))
    spec = job["spec"]
    nodes = spec["completions"]
    assert spec["completionMode"] == "Indexed" and nodes == spec["parallelism"] >= 2
    # The base's policies, with the failure budget scaled: one real failure fails every node.
    assert spec["podFailurePolicy"] == base["spec"]["podFailurePolicy"]
    assert spec["backoffLimit"] == base["spec"]["backoffLimit"] * nodes
    assert spec["ttlSecondsAfterFinished"] == base["spec"]["ttlSecondsAfterFinished"]
    pod = spec["template"]["spec"]
    assert _without(pod, "subdomain", "containers") == _without(base["spec"]["template"]["spec"], "containers")
    (container,) = pod["containers"]
    env = env_of(container)
    assert env["JOB_NPROC"] == "auto"
    assert env["PET_NNODES"] == str(nodes)
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    # Pod 0's hostname (<job>-0) in the subdomain of the headless Service that selects the Job's pods.
    service = docs[("Service", pod["subdomain"])]["spec"]
    assert env["PET_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert env["PET_MASTER_PORT"] == "29500"
    assert env["PET_RDZV_CONF"].startswith("timeout=")
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True
    assert service["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    _peer_policy(docs, "batch.kubernetes.io/job-name")


def pytorchjob():
    docs = render("overlays/pytorchjob")
    return docs, docs[("PyTorchJob", "qlora-job")]


def test_pytorchjob_replaces_the_batch_job():
    docs, job = pytorchjob()
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert not [key for key in docs if key[0] == "Job"]
    added = {("PyTorchJob", "qlora-job"), ("NetworkPolicy", "qlora-job-peers")}
    assert set(docs) - added == set(render("base")) - {("Job", "qlora-job")}
    _peer_policy(docs, "training.kubeflow.org/job-name")


def test_pytorchjob_replicas_and_policies():
    _, job = pytorchjob()
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1  # the webhook's rules
    # OnFailure: ExitCode would treat the job's exit 75 (1-127) as permanent, Never would not restart
    # at all, and backoffLimit counts only OnFailure/Always restarts.
    assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}
    run = spec["runPolicy"]
    nodes = sum(r["replicas"] for r in replicas.values())
    base = job_of(render("base"))["spec"]
    assert run["backoffLimit"] >= base["backoffLimit"] * nodes  # every stop costs about one restart per node
    assert run["cleanPodPolicy"] == "Running"
    assert run["ttlSecondsAfterFinished"] == base["ttlSecondsAfterFinished"]
    # nprocPerNode is a string (v1.7+), equal to the GPUs each pod gets.
    assert isinstance(spec["nprocPerNode"], str)
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        assert spec["nprocPerNode"] == str(container["resources"]["limits"]["nvidia.com/gpu"])


def test_pytorchjob_pods_are_the_multi_gpu_jobs_pod():
    _, job = pytorchjob()
    multi = job_of(render("overlays/multi-gpu"))["spec"]["template"]
    (multi_container,) = multi["spec"]["containers"]
    for rtype, replica in job["spec"]["pytorchReplicaSpecs"].items():
        template = replica["template"]
        assert template["metadata"]["labels"] == multi["metadata"]["labels"], rtype
        pod = template["spec"]
        # The same pod: service account, grace period, security context, node selector,
        # tolerations, volumes (the same ConfigMap, hashed name included); the restart policy comes
        # from the replica spec instead.
        assert "restartPolicy" not in pod
        assert _without(pod, "containers") == _without(multi["spec"], "containers", "restartPolicy"), rtype
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # required by the operator's webhook; it sets PET_* there
        assert _without(container, "name", "env", "ports") == _without(multi_container, "name", "env"), rtype
        assert container["image"] == job_of(render("base"))["spec"]["template"]["spec"]["containers"][0]["image"]
        env = env_of(container)
        assert _without(env, "PET_RDZV_CONF") == env_of(multi_container)  # JOB_NPROC=auto included
        assert env["PET_RDZV_CONF"].startswith("timeout=")
        # The operator takes the master's port (PET_MASTER_PORT) from the port with this name.
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500, "protocol": "TCP"}]
        # PET_* come from the operator, not from the manifest.
        assert not [name for name in env if name.startswith("PET_") and name != "PET_RDZV_CONF"]


def test_pytorchjob_replica_pods_for_validation():
    _, job = pytorchjob()
    pods = k8s_crd.replica_pods(job)
    assert [p["metadata"]["name"] for p in pods] == ["qlora-job-master-0", "qlora-job-worker-0"]
    for pod in pods:
        assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
        assert pod["spec"]["restartPolicy"] == "OnFailure"
        assert pod["metadata"]["namespace"] == "qlora-job"
        annotations = pod["metadata"]["annotations"]
        skipped = {v.split("=")[0] for k, v in annotations.items() if k.startswith("checkov.io/skip")}
        assert skipped == {"CKV_K8S_43", "CKV_K8S_8", "CKV_K8S_9"}


def test_pytorchjob_against_the_operator_sdk_models():
    _, job = pytorchjob()
    try:
        errors = k8s_crd.sdk_errors(job)
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    assert errors == []
    broken = yaml.safe_load(yaml.safe_dump(job))
    broken["spec"]["nProcPerNode"] = broken["spec"].pop("nprocPerNode")
    broken["spec"]["runPolicy"]["backoffLimit"] = "10"
    assert len(k8s_crd.sdk_errors(broken)) == 2


# -- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert "HEALTHCHECK" not in instructions  # a batch job: its health is its exit code
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+$", text, re.M)
    assert instructions.count("FROM") == 2  # builder + runtime
    assert re.findall(r"^USER (\S+)", text, re.M) == ["10001:10001"]
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]' in text
    for label in ("title", "source", "version", "revision", "licenses"):
        if label == "source":
            continue  # no public repository address to point at yet
        assert f"org.opencontainers.image.{label}=" in text
    # Nothing secret-looking is baked in through ENV or ARG defaults.
    assert not re.search(r"^(ENV|ARG)\b.*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.M | re.I)


def test_dockerignore_lets_in_only_the_build_inputs():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for match in re.finditer(r"^COPY (?!--from)(.+)$", (ROOT / "Dockerfile").read_text(), re.M):
        copied.update(match.group(1).split()[:-1])
    assert copied <= allowed, copied - allowed


def test_entrypoint_is_executable_in_git():
    mode = subprocess.run(["git", "ls-files", "-s", "entrypoint.sh"], cwd=ROOT, capture_output=True, text=True).stdout
    if not mode:
        pytest.skip("not a git checkout")
    assert mode.startswith("100755")


# -- Terraform -----------------------------------------------------------------------------------


def _plain(value):
    """python-hcl2 8 keeps string quotes ('"x"') and adds __is_block__ / __comments__: drop them."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items() if k not in ("__is_block__", "__comments__")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


@pytest.fixture(scope="module")
def tf():
    hcl2 = pytest.importorskip("hcl2")
    merged: dict = {}
    for path in sorted((ROOT / "terraform").glob("*.tf")):
        with path.open() as f:
            for key, blocks in _plain(hcl2.load(f)).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def resources(tf, kind):
    return {name: body for block in tf["resource"] for k, named in block.items() if k == kind
            for name, body in named.items()}


def test_every_variable_and_output_is_described(tf):
    for key in ("variable", "output"):
        for block in tf[key]:
            for name, body in block.items():
                assert body.get("description"), f"{key} {name} has no description"
    outputs = {name for block in tf["output"] for name in block}
    assert {"bucket", "sagemaker_role_arn", "eks_role_arn", "image_uri", "ecr_repository_url"} <= outputs


def test_bucket_private_versioned_encrypted_tls_only(tf):
    (pab,) = resources(tf, "aws_s3_bucket_public_access_block").values()
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                        "restrict_public_buckets"))
    (versioning,) = resources(tf, "aws_s3_bucket_versioning").values()
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    (sse,) = resources(tf, "aws_s3_bucket_server_side_encryption_configuration").values()
    assert sse["rule"][0]["apply_server_side_encryption_by_default"][0]["sse_algorithm"] == "aws:kms"
    policy = next(body for block in tf["data"] for k, named in block.items() if k == "aws_iam_policy_document"
                  for name, body in named.items() if name == "bucket")
    condition = policy["statement"][0]["condition"][0]
    assert policy["statement"][0]["effect"] == "Deny"
    assert (condition["variable"], condition["values"]) == ("aws:SecureTransport", ["false"])
    (lifecycle,) = resources(tf, "aws_s3_bucket_lifecycle_configuration").values()
    rules = {r["id"]: r for r in lifecycle["rule"]}
    assert rules["expire-old-checkpoints"]["noncurrent_version_expiration"]
    assert rules["abort-incomplete-multipart-uploads"]["abort_incomplete_multipart_upload"]


def test_ecr_scan_on_push_and_immutable_tags(tf):
    (repo,) = resources(tf, "aws_ecr_repository").values()
    assert repo["image_tag_mutability"] == "IMMUTABLE"
    assert repo["image_scanning_configuration"][0]["scan_on_push"] is True


def test_roles_write_only_their_own_prefix(tf):
    storage = next(body for block in tf["data"] for k, named in block.items() if k == "aws_iam_policy_document"
                   for name, body in named.items() if name == "storage")
    statements = {s["sid"]: s for s in storage["statement"]}
    assert statements["ReadWriteOwnRuns"]["resources"] == ["${local.bucket_arn}/${each.value}*"]
    assert "s3:PutObject" not in statements["ReadInputs"]["actions"]
    assert not any(r == "*" for s in storage["statement"] for r in s["resources"])
    roles = resources(tf, "aws_iam_role")
    assert set(roles) == {"sagemaker", "eks"}
