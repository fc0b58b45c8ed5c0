#!/usr/bin/env bash
# Build the real Dockerfile and run the image, on a machine with no Docker engine and no registry.
#
#   sudo scripts/image-check.sh              # build, then run every check (about 15 min cold, 2 cores)
#   sudo scripts/image-check.sh --build-only # build and smoke-test the CLI only
#
# How: Debian's buildah and podman, as root, with the vfs storage driver and chroot isolation (no
# overlayfs, no user namespaces needed). The base image cannot be pulled, so a Debian bookworm base
# with python3 is bootstrapped locally (debootstrap, about 40 s, cached as an image) and passed as
# BASE_IMAGE; torch is a CPU build (this machine's wheel when there is one). Everything else is the
# production Dockerfile, unchanged. Then the image runs, with podman, on the tiny model:
#   1. `IMAGE --version`, `IMAGE config ...`  the CLI starts as the non-root user
#   2. `IMAGE run --config ...`               the whole pipeline on a mounted folder; the files it
#                                             writes there belong to uid 10001, not root
#   3. `IMAGE train` with a fake /opt/ml       SageMaker mode fills /opt/ml/model
#   4. SIGTERM to a training container         a checkpoint is saved and the exit code is 75
#
# Environment: CHECK_DIR (storage, base image, work files; default /var/tmp/qlora-image-check),
# IMAGE (tag to build; default localhost/qlora-job:check), KEEP=1 keeps the work folder,
# SKIP_BUILD=1 reuses an existing IMAGE (to rerun the checks alone).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$PWD"
CHECK_DIR="${CHECK_DIR:-/var/tmp/qlora-image-check}"
IMAGE="${IMAGE:-localhost/qlora-job:check}"
BASE="localhost/qlora-check-base:bookworm"
BUILD_ONLY=0
[[ ${1:-} == --build-only ]] && BUILD_ONLY=1

# Shared by buildah and podman: one private store, vfs (works on any filesystem, as root, without
# fuse-overlayfs), so this never touches the host's default container storage.
STORE=(--root "$CHECK_DIR/storage" --runroot "$CHECK_DIR/runroot" --storage-driver vfs)
# runc (crun is not installed on Debian by default), cgroupfs (no systemd), no network (the job must
# not need one: inputs are on the mounted folder), and lowered open-files and process limits: runc
# cannot raise them above this sandbox's own hard limits.
RUN_OPTS=(--runtime runc --cgroup-manager cgroupfs --events-backend file --network none
          --ulimit nofile=4096:4096 --ulimit nproc=8192:8192)

step() { printf '\n==> %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
seconds() { date +%s; }
buildah_() { buildah "${STORE[@]}" "$@"; }
podman_() { podman "${STORE[@]}" "$@"; }

[[ $(id -u) == 0 ]] || fail "run as root (buildah/podman with vfs and chroot isolation need it)"
missing=()
for tool in buildah podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc debootstrap >/dev/null
fi
mkdir -p "$CHECK_DIR"

# ---------------------------------------------------------------------------------------------
# Base image: Debian bookworm minbase + python3, made once.
if ! buildah_ inspect --type image "$BASE" >/dev/null 2>&1; then
    step "bootstrapping $BASE"
    t0=$(seconds)
    rootfs="$CHECK_DIR/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3 bookworm "$rootfs" http://deb.debian.org/debian >"$CHECK_DIR/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    ctr=$(buildah_ from scratch)
    mnt=$(buildah_ mount "$ctr")
    cp -a "$rootfs"/. "$mnt"/
    buildah_ umount "$ctr" >/dev/null
    buildah_ config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    buildah_ commit --quiet "$ctr" "$BASE" >/dev/null
    buildah_ rm "$ctr" >/dev/null
    rm -rf "$rootfs"
    echo "base image in $(($(seconds) - t0)) s" >&2
fi

# ---------------------------------------------------------------------------------------------
# Build. The context is a copy of what .dockerignore lets in (README.md is required by pyproject.toml;
# a placeholder stands in while it does not exist yet).
step "building $IMAGE"
ctx="$CHECK_DIR/context"
rm -rf "$ctx"
mkdir -p "$ctx/scripts"
cp -a Dockerfile .dockerignore pyproject.toml entrypoint.sh job "$ctx"/
cp -a constraints.txt "$ctx"/
if [[ -f README.md ]]; then cp README.md "$ctx/"; else echo "placeholder for the check build" >"$ctx/README.md"; fi
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +

build_args=(--build-arg BASE_IMAGE="$BASE" --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
            --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)")
volumes=()
# torch: this machine's CPU wheel if it has one for the base's Python (3.11), else PyTorch's CPU index.
wheel=$(compgen -G "/opt/wheels/torch-*+cpu-cp311-*.whl" | head -n1 || true)
if [[ -n $wheel ]]; then
    version=$(basename "$wheel" | cut -d- -f2)
    build_args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg "TORCH_VERSION=$version"
                 --build-arg PIP_FIND_LINKS=/wheels)
    volumes+=(-v "$(dirname "$wheel"):/wheels:ro")
else
    build_args+=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg TORCH_VERSION=2.11.0)
fi
# A TLS-inspecting proxy's CA, if the host trusts one: mounted for the build only, never copied in.
ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [[ -n $ca && -f $ca ]]; then
    build_args+=(--build-arg PIP_CERT=/run/host-ca.crt)
    volumes+=(-v "$ca:/run/host-ca.crt:ro")
fi
t0=$(seconds)
if [[ ${SKIP_BUILD:-0} == 1 ]] && buildah_ inspect --type image "$IMAGE" >/dev/null 2>&1; then
    echo "SKIP_BUILD=1: using the existing $IMAGE" >&2
else
    buildah_ bud --isolation chroot --network host --layers "${build_args[@]}" "${volumes[@]}" \
        -f "$ctx/Dockerfile" -t "$IMAGE" "$ctx" >"$CHECK_DIR/build.log" 2>&1 \
        || { tail -n 40 "$CHECK_DIR/build.log" >&2; fail "build failed (log: $CHECK_DIR/build.log)"; }
    # vfs keeps a full copy per layer: drop the images that the new build left untagged.
    buildah_ rmi --prune >/dev/null 2>&1 || true
fi
build_s=$(($(seconds) - t0))
size=$(podman_ image inspect --format '{{.Size}}' "$IMAGE")
echo "built in ${build_s} s; image size $((size / 1000000)) MB (CPU torch; the CUDA build is larger, see docs/deploy.md)" >&2

step "CLI smoke test"
# One plain `podman run` of the image as built (its own ENTRYPOINT, CMD, USER, ENV). With vfs every
# container starts from a full copy of the image (about a minute for 2 GB), so the runs after this
# one share a single copy of the image's filesystem, mounted read-only as --rootfs with the image's
# own user, environment, working directory and entry point: the same files and settings, and a
# read-only root filesystem as in k8s/base (tmpfs on /tmp and $HOME, like its emptyDir volumes).
[[ $(podman_ image inspect --format '{{.Config.User}}' "$IMAGE") == 10001:10001 ]] || fail "image USER is not 10001:10001"
podman_ run --rm "${RUN_OPTS[@]}" "$IMAGE" --version || fail "IMAGE --version failed"

rootfs_copy="$CHECK_DIR/rootfs-run"
rm -rf "$rootfs_copy"
mnt=$(podman_ image mount "$IMAGE")
cp -a "$mnt" "$rootfs_copy"
podman_ image unmount "$IMAGE" >/dev/null
mapfile -t image_env < <(podman_ image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
mapfile -t entrypoint < <(podman_ image inspect --format '{{range .Config.Entrypoint}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
# shellcheck disable=SC2054  # the commas are tmpfs mount options, not array separators
IMAGE_OPTS=(--read-only --user 10001:10001
            --workdir "$(podman_ image inspect --format '{{.Config.WorkingDir}}' "$IMAGE")"
            --tmpfs /tmp:rw,exec,mode=1777 --tmpfs /home/job:rw,exec,mode=1777
            --entrypoint "$(printf '%s\n' "${entrypoint[@]}" | jq -Rsc 'split("\n") | map(select(length > 0))')")
for e in "${image_env[@]}"; do IMAGE_OPTS+=(--env "$e"); done
# run_image [PODMAN OPTIONS...] -- [ARGUMENTS...]: with --rootfs, the path is the first positional
# argument, so the options given here go before it and the container's arguments after it.
run_image() {
    local opts=()
    while (($#)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    podman_ run "${RUN_OPTS[@]}" "${IMAGE_OPTS[@]}" "${opts[@]}" --rootfs "$rootfs_copy" "$@"
}

user=$(run_image --rm --entrypoint id -- -u)
[[ $user == 10001 ]] || fail "runs as uid $user, expected 10001"
run_image --rm -- config --set run_uri=/tmp/r --set data.uri=/tmp/d.csv --set model.uri=/tmp/m >/dev/null \
    || fail "IMAGE config failed"
rc=0; run_image --rm -- serve 2>/dev/null || rc=$?
((rc == 2)) || fail "IMAGE serve exited $rc, expected 2"
if ((BUILD_ONLY)); then
    echo "build-only: OK" >&2
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# Inputs on a mounted folder: the tiny model (made with the job's own tiny_model, by the host's
# Python if it has the job's dependencies, else inside the image) and 300 SNLI rows.
work="$CHECK_DIR/work"
rm -rf "$work"
mkdir -p "$work/data" "$work/runs"
chmod 0777 "$work/runs"   # the container's user (10001) writes here; the inputs stay root's, read-only
snli="$REPO/../shared/data/snli/train.csv"
[[ -f $snli ]] || fail "no SNLI sample at $snli"
head -n 301 "$snli" >"$work/data/snli.csv"
step "making the tiny model"
if [[ -x $REPO/.venv/bin/python ]]; then
    "$REPO/.venv/bin/python" -m job.tiny_model "$work/model" --csv "$work/data/snli.csv" >/dev/null
else
    chmod 0777 "$work"
    run_image --rm -v "$work:/check" --entrypoint python -- -m job.tiny_model /check/model \
        --csv /check/data/snli.csv >/dev/null
fi
chmod -R a+rX "$work/model" "$work/data"

# Small and quick on a CPU; every stage runs. (4-bit is bitsandbytes' CPU NF4.)
cat >"$work/config.yaml" <<'EOF'
data: {uri: /check/data/snli.csv, eval_size: 8}
model: {uri: /check/model}
train: {max_steps: 6, lora_r: 8, micro_batch_size: 4, packing_length: 256, gradient_checkpointing: false,
        logging_steps: 1, checkpoint_every_steps: 3, warmup_steps: 1}
evaluate: {max_new_tokens: 24, max_examples: 8, batch_size: 8}
EOF

check_owner() {   # every file the job wrote on the mount belongs to the image's user
    local bad
    bad=$(find "$1" ! -uid 10001 -print | head -n 5)
    [[ -z $bad ]] || fail "files on the mount not owned by uid 10001: $bad"
}
check_artifacts() {
    local dir="$1" name
    for name in adapter/adapter_config.json merged/config.json report/report.json; do
        [[ -s $dir/$name ]] || fail "missing $dir/$name"
    done
}

step "IMAGE run --config (docker run style)"
t0=$(seconds)
run_image --rm -v "$work:/check" -e JOB_RUN_URI=/check/runs/docker-run -- \
    run --config /check/config.yaml 2>"$work/run.log" || { tail -n 40 "$work/run.log" >&2; fail "IMAGE run failed"; }
check_artifacts "$work/runs/docker-run"
check_owner "$work/runs/docker-run"
echo "run: OK in $(($(seconds) - t0)) s; files owned by uid 10001" >&2

step "IMAGE train (SageMaker conventions on a fake /opt/ml)"
sm="$work/opt_ml"
mkdir -p "$sm/input/config" "$sm/input/data/data" "$sm/input/data/config" "$sm/model" "$sm/output" "$sm/checkpoints"
cp "$work/data/snli.csv" "$sm/input/data/data/"
cp -a "$work/model" "$sm/input/data/model"
grep -v '^data:\|^model:' "$work/config.yaml" >"$sm/input/data/config/job.yaml"
echo '{"train.max_steps": "4", "data.eval_size": "8"}' >"$sm/input/config/hyperparameters.json"
chmod -R a+rX "$sm/input"
chown -R 10001:10001 "$sm/model" "$sm/output" "$sm/checkpoints"
t0=$(seconds)
run_image --rm -v "$sm:/opt/ml" -- train 2>"$work/train.log" \
    || { tail -n 40 "$work/train.log" >&2; fail "IMAGE train failed"; }
check_artifacts "$sm/model"
[[ -f $sm/checkpoints/run/_stages/train.json ]] || fail "no run under /opt/ml/checkpoints/run"
[[ ! -e $sm/output/failure ]] || fail "failure file written on success"
echo "train (SageMaker): OK in $(($(seconds) - t0)) s; /opt/ml/model has adapter, merged, report" >&2

step "SIGTERM during training -> checkpoint and exit 75"
name="qlora-check-term-$$"
podman_ rm -f "$name" >/dev/null 2>&1 || true
run_image -d --name "$name" -v "$work:/check" -e JOB_RUN_URI=/check/runs/sigterm -- \
    run --config /check/config.yaml --set train.max_steps=100000 --set train.checkpoint_every_steps=0 \
    --set train.checkpoint_every_minutes=0 >/dev/null
started="$work/runs/sigterm/_stages/train.started.json"
for _ in $(seq 600); do
    [[ -e $started ]] && break
    [[ $(podman_ inspect --format '{{.State.Running}}' "$name") == true ]] || break
    sleep 0.5
done
[[ -e $started ]] || { podman_ logs "$name" 2>&1 | tail -n 30 >&2; fail "training never started"; }
sleep 10   # a few optimizer steps
podman_ kill --signal TERM "$name" >/dev/null
rc=$(podman_ wait "$name")
podman_ logs "$name" >"$work/sigterm.log" 2>&1 || true
podman_ rm "$name" >/dev/null
((rc == 75)) || { tail -n 30 "$work/sigterm.log" >&2; fail "SIGTERM: exit code $rc, expected 75"; }
[[ -s $work/runs/sigterm/checkpoints/LATEST ]] || fail "SIGTERM: no checkpoints/LATEST"
check_owner "$work/runs/sigterm"
echo "SIGTERM: OK (exit 75, checkpoints/LATEST: $(tr -d ' \n' <"$work/runs/sigterm/checkpoints/LATEST" | cut -c1-60)...)" >&2

[[ ${KEEP:-0} == 1 ]] || rm -rf "$work" "$rootfs_copy"
printf '\nimage check passed: build %s s, size %s MB\n' "$build_s" "$((size / 1000000))"
