#!/usr/bin/env bash
# The image's entry point: one image for Kubernetes, SageMaker, RunPod and `docker run`.
#
#   IMAGE [job] ARGS...   ->  exec job ARGS...      (Kubernetes, RunPod, docker run; no args: `job run`)
#   IMAGE train [ARGS...] ->  SageMaker training:   job run ARGS... with SageMaker's conventions, then
#                                                   the artifacts are copied to /opt/ml/model
#   IMAGE serve           ->  exit 2: this image trains; it does not serve endpoints
#
# Exit codes are the job's own (0, 1, 2, 3, 4 when another job holds the run, 5 out of memory, 69 when
# a node of a multi-node run was lost, and 75 after a preemption checkpoint), unchanged.
# Paths can be moved for tests: SM_ROOT (default /opt/ml), RUNPOD_WORKSPACE (default /workspace).
# Variables named JOB_<SECTION>__<KEY> and JOB_RUN_URI are the job's configuration (an unknown key
# of that shape is an error; other JOB_* names are ignored), so this script only sets keys the job knows.
set -euo pipefail

SM_ROOT="${SM_ROOT:-/opt/ml}"
RUNPOD_WORKSPACE="${RUNPOD_WORKSPACE:-/workspace}"
# SageMaker shows the first 1024 characters of the failure file as the job's FailureReason.
FAILURE_LIMIT=1024
# Several nodes: how long (s) the rendezvous waits for every node, unless PET_RDZV_CONF says otherwise.
RENDEZVOUS_TIMEOUT_DEFAULT=1800

log() { printf 'entrypoint: %s\n' "$*" >&2; }

# RunPod (and any host that mounts a persistent /workspace volume): keep the model download and the
# Hugging Face cache there, so a restarted pod does not download the base model again. Only when
# the user chose no cache location, and only when the folder is writable by this (non-root) user.
use_workspace_cache() {
    if [[ -d $RUNPOD_WORKSPACE && -w $RUNPOD_WORKSPACE && -z ${HF_HOME:-} && -z ${JOB_CACHE_DIR:-} \
          && -z ${JOB_MODEL__CACHE_DIR:-} ]]; then
        # JOB_CACHE_DIR rather than model.cache_dir: where a download is cached must not be part of
        # the run's configuration (nor of any stage fingerprint).
        export JOB_CACHE_DIR="$RUNPOD_WORKSPACE/.cache/qlora-job"
        export HF_HOME="$RUNPOD_WORKSPACE/.cache/huggingface"
        log "caching downloads under $RUNPOD_WORKSPACE/.cache"
    fi
}

# ---------------------------------------------------------------------------------------------
# Multi-GPU launch.

# How many GPU processes JOB_NPROC asks for on this node (1: the plain single-process job). Without
# JOB_NPROC, the Kubeflow training operator's PET_NPROC_PER_NODE (its nprocPerNode: a number or
# "auto") decides, so that a PyTorchJob needs no JOB_NPROC. Either's "auto" counts GPUs here, not
# torchrun's way (which would start one process per CPU core on a machine without GPUs).
gpu_processes() {
    local wanted="${JOB_NPROC:-${PET_NPROC_PER_NODE:-1}}" count source=JOB_NPROC
    if [[ -z ${JOB_NPROC:-} && -n ${PET_NPROC_PER_NODE:-} ]]; then source=PET_NPROC_PER_NODE; fi
    if [[ $wanted == auto ]]; then
        if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
            IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
            count=${#devices[@]}
        elif command -v nvidia-smi >/dev/null 2>&1; then
            count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
        else
            count=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
        fi
        wanted=$((count > 1 ? count : 1))
    fi
    if ! [[ $wanted =~ ^[1-9][0-9]*$ ]]; then
        log "$source must be auto or a positive number, got '$wanted'"
        return 2
    fi
    printf '%s\n' "$wanted"
}

# SageMaker multi-instance training: resourceconfig.json lists the hosts; the first is the master.
sagemaker_nodes() {
    local file="$SM_ROOT/input/config/resourceconfig.json" values
    [[ -f $file && -z ${PET_NNODES:-} ]] || return 0
    values=$(python3 - "$file" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    config = json.load(f)
hosts = sorted(config["hosts"])
print(len(hosts), hosts.index(config["current_host"]), hosts[0])
PY
    ) || { log "cannot read $file"; return 0; }
    read -r nodes rank master <<<"$values"
    if ((nodes > 1)); then
        export PET_NNODES="$nodes" PET_NODE_RANK="$rank" PET_MASTER_ADDR="$master"
        export PET_MASTER_PORT="${PET_MASTER_PORT:-29500}"
        log "SageMaker: node $rank of $nodes, master $master"
    fi
}

# The command that runs the job: `job`, or torchrun over this node's GPUs. Sets LAUNCH (an array).
# torchrun runs through job.launch (job/launch.py): the same torchrun, in the same process, which
# prints one line instead of its traceback when a process, the rendezvous or a signal stops it.
launch_command() {
    local nproc
    nproc=$(gpu_processes) || return 2
    if ((nproc == 1)) && [[ -z ${PET_NNODES:-} ]]; then
        LAUNCH=(job)
        return 0
    fi
    # The shutdown timeout is how long torchrun lets its workers finish after a SIGTERM before it
    # kills them (its default, 30 s, is too short to save and upload a checkpoint): keep it below
    # the platform's grace period (Kubernetes terminationGracePeriodSeconds: 600 in k8s/base).
    LAUNCH=(python3 -m job.launch --nproc-per-node "$nproc" --shutdown-timeout "${JOB_SHUTDOWN_TIMEOUT:-540}")
    if [[ -z ${PET_NNODES:-} ]]; then
        LAUNCH+=(--standalone)
    else
        # Several nodes: torchrun's static rendezvous on PET_MASTER_ADDR:PET_MASTER_PORT waits this long
        # (seconds) for every node to join. torchrun's default, 600, is short for a node that is still
        # pulling the image or waiting for a GPU machine; PET_RDZV_CONF=timeout=N overrides it.
        export PET_RDZV_CONF="${PET_RDZV_CONF:-timeout=${RENDEZVOUS_TIMEOUT_DEFAULT}}"
    fi
    LAUNCH+=(-m job)
    JOB_EXIT_CODE_FILE="$(mktemp "${TMPDIR:-/tmp}/job-exit-code.XXXXXX")"
    export JOB_EXIT_CODE_FILE
    log "multi-GPU: $nproc processes on this node${PET_NNODES:+, node ${PET_NODE_RANK:-?} of $PET_NNODES}"
}

# Run "$@" as a child, forward SIGTERM/SIGINT to it, and set RC to its real exit code: `wait`
# returns early (128+signal) when a trap runs, so it is called again until the child has ended.
# Under torchrun the job's own code comes from JOB_EXIT_CODE_FILE (torchrun says 1 for any failure;
# so does job.launch, after its one line).
run_forwarding_signals() {
    local signalled=0 child
    "$@" &
    child=$!
    trap 'signalled=1; kill -TERM "$child" 2>/dev/null || true' TERM
    trap 'signalled=1; kill -INT "$child" 2>/dev/null || true' INT
    while true; do
        signalled=0
        RC=0
        wait "$child" || RC=$?
        if ((signalled)); then continue; fi
        break
    done
    trap - TERM INT
    if [[ -n ${JOB_EXIT_CODE_FILE:-} && -s $JOB_EXIT_CODE_FILE ]]; then
        RC=$(<"$JOB_EXIT_CODE_FILE")
        rm -f "$JOB_EXIT_CODE_FILE"
    fi
}

# Kubernetes, RunPod, docker run: exec the job (it gets SIGTERM itself, under tini), or under
# torchrun stay as the parent to hand back the job's exit code.
run_job() {
    launch_command || exit 2
    if [[ ${LAUNCH[0]} == job ]]; then
        exec job "$@"
    fi
    run_forwarding_signals "${LAUNCH[@]}" "$@"
    exit "$RC"
}

# ---------------------------------------------------------------------------------------------
# SageMaker. Configuration reaches the job through ONE mechanism per source, in the job's own
# precedence (DESIGN.md): hyperparameters.json is read by the job itself as a config layer (keys are
# dotted, e.g. "train.learning_rate"; values are the strings SageMaker writes), and the estimator's
# `environment` sets JOB_* variables. This script adds only SageMaker's locations, as defaults that a
# hyperparameter or a JOB_* variable overrides: the `data` channel (data.uri), the `model` channel
# (model.uri), the checkpoint folder (run_uri), and a `config` channel (--config FILE). Because
# they are passed as JOB_* variables, they do override the same keys in a config-channel file.

hp_file() { printf '%s/input/config/hyperparameters.json' "$SM_ROOT"; }

# Print the value of hyperparameter $1 and succeed, or fail when it is not set.
hyperparameter() {
    local file
    file="$(hp_file)"
    [[ -f $file ]] || return 1
    python3 - "$file" "$1" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    params = json.load(f)
if sys.argv[2] not in params:
    sys.exit(1)
value = params[sys.argv[2]]
print(value if isinstance(value, str) else json.dumps(value))
PY
}

# Set JOB_<NAME>=$2 for the dotted key $1 unless a hyperparameter or the environment already sets it.
default_key() {
    local key="$1" value="$2" var
    var="JOB_$(tr '[:lower:]' '[:upper:]' <<<"${key/./__}")"
    if [[ -n ${!var:-} ]]; then
        log "$key from \$$var"
    elif hyperparameter "$key" >/dev/null; then
        log "$key from hyperparameters.json"
    else
        export "$var=$value"
        log "$key=$value (SageMaker default)"
    fi
}

# The one file in channel folder $1 whose name matches one of the globs that follow.
single_file() {
    local dir="$1" matches=()
    shift
    local pattern
    shopt -s nullglob
    # shellcheck disable=SC2206  # the pattern is meant to glob (nullglob: no match, no word)
    for pattern in "$@"; do matches+=("$dir"/$pattern); done
    shopt -u nullglob
    if ((${#matches[@]} != 1)); then
        printf 'channel %s: expected exactly one %s file, found %d\n' "$dir" "$*" "${#matches[@]}" >&2
        return 1
    fi
    printf '%s\n' "${matches[0]}"
}

# The model channel folder, or its single subfolder when the S3 prefix held one model folder.
model_folder() {
    local dir="$1" subdirs=()
    if [[ ! -e $dir/config.json ]]; then
        shopt -s nullglob
        subdirs=("$dir"/*/config.json)
        shopt -u nullglob
        if ((${#subdirs[@]} == 1)); then dir="$(dirname "${subdirs[0]}")"; fi
    fi
    printf '%s\n' "$dir"
}

# Write the failure reason where SageMaker reads it: the exit code and the tail of stderr, cut to
# whole lines so that the most useful part (the error itself) fits in FAILURE_LIMIT characters.
write_failure() {
    local rc="$1" stderr_file="$2" failure="$SM_ROOT/output/failure" header body
    mkdir -p "$SM_ROOT/output" 2>/dev/null || true
    header="job run exited with code $rc"
    case "$rc" in
        2) header+=" (bad configuration or input)" ;;
        3) header+=" (storage or access failure)" ;;
        4) header+=" (another job holds this run's lease)" ;;
        5) header+=" (out of memory: the message names the setting to change)" ;;
        69) header+=" (a node of the multi-node run was lost; safe to restart)" ;;
        75) header+=" (stopped by SIGTERM after a checkpoint; safe to restart)" ;;
    esac
    local budget=$((FAILURE_LIMIT - ${#header} - 2))
    body="$(tail -c "$budget" "$stderr_file" 2>/dev/null || true)"
    # When the tail was cut, its first line is probably partial: drop it unless it is the only one.
    if (($(wc -c <"$stderr_file") > budget)) && [[ $body == *$'\n'* ]]; then body="${body#*$'\n'}"; fi
    if ! printf '%s\n%s\n' "$header" "$body" >"$failure" 2>/dev/null; then
        log "cannot write $failure"
    fi
}

# Copy the run's final artifacts into $SM_ROOT/model, which SageMaker uploads as model.tar.gz.
# Hard links where possible: the merged model can be tens of GB and already sits in the run folder.
export_artifacts() {
    local run_uri="$1" name
    if [[ $run_uri == *://* && $run_uri != file://* ]]; then
        log "run_uri is $run_uri: the adapter, merged model and report stay there (not copied to $SM_ROOT/model)"
        return 0
    fi
    run_uri="${run_uri#file://}"
    mkdir -p "$SM_ROOT/model"
    for name in adapter merged report; do
        if [[ ! -d $run_uri/$name ]]; then
            log "no $run_uri/$name to export (stage not run?)"
            continue
        fi
        rm -rf "${SM_ROOT:?}/model/$name"
        if ! cp -R -l "$run_uri/$name" "$SM_ROOT/model/$name" 2>/dev/null; then
            rm -rf "${SM_ROOT:?}/model/$name"
            cp -R "$run_uri/$name" "$SM_ROOT/model/$name"
        fi
        log "exported $name to $SM_ROOT/model/$name"
    done
}

sagemaker_train() {
    local args=() channel dir file run_uri rc stderr_file

    # The job reads hyperparameters.json itself; point it at SM_ROOT's copy (the same file in
    # production, a temporary tree in tests).
    export JOB_SAGEMAKER_HYPERPARAMETERS="${JOB_SAGEMAKER_HYPERPARAMETERS:-$(hp_file)}"

    stderr_file="$(mktemp "${TMPDIR:-/tmp}/job-stderr.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -f '$stderr_file'" EXIT

    channel="$SM_ROOT/input/data"
    if [[ -d $channel/config ]]; then
        if ! file="$(single_file "$channel/config" '*.yaml' '*.yml' 2>"$stderr_file")"; then
            cat "$stderr_file" >&2
            write_failure 2 "$stderr_file"
            return 2
        fi
        args+=(--config "$file")
    fi
    if [[ -d $channel/data ]]; then
        if ! file="$(single_file "$channel/data" '*.csv' 2>"$stderr_file")"; then
            cat "$stderr_file" >&2
            write_failure 2 "$stderr_file"
            return 2
        fi
        default_key data.uri "$file"
    fi
    if [[ -d $channel/model ]]; then
        default_key model.uri "$(model_folder "$channel/model")"
    fi
    # SageMaker syncs /opt/ml/checkpoints with checkpoint_s3_uri (managed spot): a restarted job
    # finds the run there, with its stage markers and the last uploaded training checkpoint.
    default_key run_uri "$SM_ROOT/checkpoints/run"
    if [[ -n ${JOB_RUN_URI:-} ]]; then
        run_uri="$JOB_RUN_URI"
    else
        run_uri="$(hyperparameter run_uri)"
    fi

    for dir in "$SM_ROOT/model" "$SM_ROOT/output"; do
        if ! mkdir -p "$dir" 2>/dev/null || [[ ! -w $dir ]]; then
            log "$dir is not writable by uid $(id -u): the job's artifacts and failure reason cannot be saved there"
        fi
    done

    # Not `exec`: the artifacts are copied after the job ends, so this shell stays as the parent.
    # It forwards SIGTERM/SIGINT (spot interruption, StopTrainingJob) to the job, which saves and
    # uploads a checkpoint and exits 75, and then waits for the job's real exit code.
    # stderr goes through tee, so it reaches CloudWatch as it happens and the failure file later.
    sagemaker_nodes
    if ! launch_command 2>"$stderr_file"; then
        cat "$stderr_file" >&2
        write_failure 2 "$stderr_file"
        return 2
    fi
    exec 3> >(tee -a "$stderr_file" >&2)
    local tee_pid=$!
    run_forwarding_signals "${LAUNCH[@]}" run "${args[@]}" "$@" 2>&3
    rc=$RC
    exec 3>&-
    wait "$tee_pid" 2>/dev/null || true

    if ((rc == 0)); then
        export_artifacts "$run_uri"
    else
        write_failure "$rc" "$stderr_file"
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------------------------

use_workspace_cache

case "${1:-}" in
    train)
        shift
        rc=0
        sagemaker_train "$@" || rc=$?
        exit "$rc"
        ;;
    serve)
        log "serve: this image runs training jobs only; use \`job predict\` or a serving image for inference"
        exit 2
        ;;
    job)
        shift
        run_job "$@"
        ;;
    "")
        run_job run
        ;;
    *)
        # One process: exec, the job becomes the container's main process (under tini) and gets
        # SIGTERM itself. Several (JOB_NPROC): torchrun, with this shell forwarding the signals.
        run_job "$@"
        ;;
esac
