"""The memory plan: for every stage, where it runs and the peak GPU memory, host memory and disk it needs,
for this model on this machine, before anything runs.

QLoRA exists so that one card can fine-tune a model whose 16-bit copy does not fit on it; every stage
after training must then work within what training needed. The plan comes from the model's config.json
and the machine (free GPU memory from `mem_get_info`, available host memory, free disk in the cache).
`job plan` prints it, `job run` logs it, a run whose stages cannot fit is refused with exit 2 before
training starts (naming the stage, the numbers and the setting that makes it fit), and each stage's
marker records its line of the plan next to the peaks it measured (job/peaks.py).

The formulas, per stage (N parameters; L layers; h hidden; i intermediate; V vocabulary; bytes):
- train, GPU: the NF4 base (0.5625 bytes per linear weight, 16-bit embeddings and head), LoRA weights
  with their gradients and AdamW state (16 bytes per LoRA parameter), 1.5 GiB of context and workspace,
  and at least one packed row of activations with checkpointing. The batch planner (train.plan_batch)
  then fills up to 90% of the free memory; that is the expected peak.
  Host: the interpreter with torch and CUDA (HOST_BASE), plus the largest safetensors file being read.
- merge, shard by shard: the host holds the interpreter, the adapter in fp32 and a few fp32 copies of
  the largest tensor; the GPU, when used, only those tensors. The logits check (base+adapter against
  merged) needs the 16-bit model on the GPU and runs only where it fits (else skipped, with the reason).
- export: writes one tensor at a time and reads each back the same way (host: HOST_BASE plus a few fp32
  copies of the largest tensor); disk: the GGUF files.
- evaluate: the merged 16-bit model on the GPU when it fits with its KV cache, else the 4-bit base plus
  the adapter, the model as trained (evaluate.model: auto), with the generation batch the memory left
  holds: the very rule evaluate applies (job/predict.py). On a machine without a GPU, the merged model
  in fp32 in host memory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 2**30
HOST_BASE = 2.5 * GiB      # python + torch + transformers + CUDA's host side; measured, docs/benchmarks.md
GPU_FIXED = 1.5 * GiB      # CUDA context, cuBLAS workspace, allocator slack
NF4_BYTES = 0.5625         # 4 bits + one fp8 absmax per 64 (double quantization) + rounding
GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
PROMPT_TOKENS = 256        # an instruction prompt of the worked example, generously
# The merge's logits check on the CPU: a forward over a few examples is cheap for a small model; a large one
# would need the whole model in host memory, which the streaming merge exists to avoid.
CPU_CHECK_MAX_BYTES = 4 * GiB


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from config.json."""
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    config: dict = field(default_factory=dict, compare=False, repr=False)  # config.json, for shared estimates

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        text = config.get("text_config") or {}
        get = lambda key, default=None: config.get(key, text.get(key, default))  # noqa: E731
        hidden, heads = int(get("hidden_size", 4096)), int(get("num_attention_heads", 32))
        return cls(hidden=hidden, layers=int(get("num_hidden_layers", 32)),
                   intermediate=int(get("intermediate_size", 4 * hidden)), vocab=int(get("vocab_size", 32000)),
                   heads=heads, kv_heads=int(get("num_key_value_heads", heads) or heads),
                   head_dim=int(get("head_dim", None) or hidden // heads),
                   tied=bool(get("tie_word_embeddings", False)), config=config)

    @property
    def linear_per_layer(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + k_v + 3 * self.hidden * self.intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.linear_per_layer + self.embedding_params

    @property
    def largest_tensor(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    def lora_params(self, r: int) -> int:
        """All seven linear kinds (all-linear); fewer targets only make it smaller."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return self.layers * r * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)

    def activation_bytes_per_token(self, checkpointing: bool, liger: bool = False, lora_dropout: float = 0.1) -> int:
        """Training activations a token of the micro-batch costs (bf16), calibrated on a 7B (train.plan_batch's
        docstring has the measurements): without checkpointing every layer keeps about 14*h + 5*i values
        (less with Liger or without LoRA dropout); with it, each layer keeps its input and one layer's
        activations are live. The logits add 8*V bytes (fp32 and their gradient)."""
        h, i = self.hidden, self.intermediate
        if checkpointing:
            return 2 * (h * self.layers + 16 * h + 6 * i) + 8 * self.vocab
        # dropout 0 (or the dropout recomputed) saves about 5*h + i: 6*h + i by the stored copies, less what
        # the H100 measured with Liger (4.19 MB a token on the 7B, not 3.94; docs/benchmarks.md)
        per_layer = 14 * h + 5 * i - ((2 * h + i) if liger else 0) - ((5 * h + i) if lora_dropout == 0 else 0)
        return 2 * self.layers * per_layer + 8 * self.vocab

    def kv_cache_bytes(self, sequences: int, tokens: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2 * sequences * tokens


@dataclass(frozen=True)
class Machine:
    gpu_free: int | None      # None: no GPU
    gpu_total: int | None
    host_available: int
    disk_free: int

    @classmethod
    def detect(cls, folder: Path, gpu: bool = True) -> "Machine":
        """This machine now. gpu=False leaves torch unimported (the format stage needs no GPU)."""
        gpu_free = gpu_total = None
        if gpu:
            import torch

            if torch.cuda.is_available():
                gpu_free, gpu_total = torch.cuda.mem_get_info()
        folder.mkdir(parents=True, exist_ok=True)
        from job.memory import host_available_bytes

        host = host_available_bytes()
        if host is None:  # neither /proc/meminfo nor a cgroup limit: the machine's RAM
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(gpu_free=gpu_free, gpu_total=gpu_total, host_available=host,
                   disk_free=shutil.disk_usage(folder).free)

    def assuming(self, gpu_memory: float | None = None, host_memory: float | None = None,
                 disk: float | None = None) -> "Machine":
        """Another machine, for planning ahead (`job plan --gpu-memory 80 --host-memory 200`): GiB; a GPU
        of 0 GiB means none."""
        gpu = self.gpu_free if gpu_memory is None else (int(gpu_memory * GiB) or None)
        return Machine(gpu_free=gpu, gpu_total=self.gpu_total if gpu_memory is None else gpu,
                       host_available=self.host_available if host_memory is None else int(host_memory * GiB),
                       disk_free=self.disk_free if disk is None else int(disk * GiB))

    def describe(self) -> str:
        gpu = (f"GPU {self.gpu_free / GiB:.1f} of {self.gpu_total / GiB:.1f} GiB free" if self.gpu_free is not None
               else "no GPU")
        return (f"{gpu}; host {self.host_available / GiB:.1f} GiB available; "
                f"disk {self.disk_free / GiB:.1f} GiB free")


@dataclass
class StagePlan:
    stage: str
    device: str
    gpu_bytes: int
    host_bytes: int
    disk_bytes: int
    how: str
    problem: str = ""          # empty: it fits
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """The marker's `memory_plan`: GiB, rounded."""
        out = {k: v for k, v in asdict(self).items() if not k.endswith("_bytes")}
        out.update({k.replace("_bytes", "_gb"): round(v / GiB, 2) for k, v in asdict(self).items()
                    if k.endswith("_bytes")})
        return out


def plan_stages(cfg, shape: ModelShape, machine: Machine, stages: list[str]) -> list[StagePlan]:
    """One StagePlan per stage name in `stages` (format, train, merge, export, evaluate)."""
    t, gpu = cfg.train, machine.gpu_free
    params16 = 2 * shape.params
    largest32 = 4 * shape.largest_tensor
    lora = shape.lora_params(t.lora_r)
    base4 = (NF4_BYTES if t.load_in_4bit else 2.0) * shape.layers * shape.linear_per_layer + 2 * shape.embedding_params
    merged_bytes = shape.params * (4 if cfg.merge.dtype == "fp32" else 2)
    plans = []
    for stage in stages:
        if stage == "format":
            plans.append(StagePlan("format", "cpu", 0, int(HOST_BASE), 0, "reads the data once, writes data/*.jsonl"))
        elif stage == "train":
            plans.append(_train(cfg, shape, machine, base4, lora))
        elif stage == "merge":
            p = StagePlan("merge", "cuda" if gpu is not None and cfg.merge.device != "cpu" else "cpu",
                          int(3 * largest32) if gpu is not None and cfg.merge.device != "cpu" else 0,
                          int(HOST_BASE + 4 * lora + 3 * largest32), merged_bytes,
                          "shard by shard from the base's safetensors")
            # The logits check needs the whole 16-bit model: the merge stage's rule (check_logits_plan).
            if gpu is not None and params16 * 1.15 + GPU_FIXED <= gpu:
                p.gpu_bytes, p.notes = int(params16 * 1.15 + GPU_FIXED), ["logits check on the GPU"]
            elif params16 <= CPU_CHECK_MAX_BYTES and params16 * 4 <= machine.host_available:
                p.host_bytes += int(2 * params16)
                p.notes = ["logits check on the CPU (a small model)"]
            else:
                p.notes = ["logits check skipped: the 16-bit model does not fit "
                           + ("the GPU" if gpu is not None else "this machine") + "; every tensor is checked"]
            plans.append(p)
        elif stage == "export":
            disk = int(sum(GGUF_BYTES.get(kind, 2.0) * shape.params for kind in cfg.export.gguf))
            # 4 fp32 copies of the largest tensor: 3.6 of them measured beyond HOST_BASE on the
            # 70B-wide model (H100, 2026-12-07), the GGUF writer and the read-back each holding some
            plans.append(StagePlan("export", "cpu", 0, int(HOST_BASE + 4 * largest32), disk,
                                   f"writes {', '.join(cfg.export.gguf)} one tensor at a time; per-tensor read-back"))
        elif stage == "evaluate":
            plans.append(_evaluate(cfg, shape, machine, base4, lora))
    _check_disk(plans, machine)
    _check_host(plans, machine)
    return plans


def _train(cfg, shape: ModelShape, machine: Machine, base4: float, lora: int) -> StagePlan:
    t = cfg.train
    length = max(2048, t.max_seq_length) if t.packing_length == "auto" else int(t.packing_length)
    fixed = base4 + 16 * lora + GPU_FIXED
    need = fixed + shape.activation_bytes_per_token(checkpointing=True) * length  # one packed row, checkpointed
    # The batch planner fills up to 90% of the free memory with up to 16k tokens (no checkpointing) per step.
    # With train.recompute_lora_dropout true, or auto with the fused LoRA function (train.fused_lora auto: on
    # CUDA), a run without checkpointing draws the LoRA dropout again in the backward pass and stores what
    # dropout 0 stores (job/lora_dropout.py choose_recompute, not imported here: it needs torch).
    recomputed = t.recompute_lora_dropout is True or (t.recompute_lora_dropout == "auto" and t.fused_lora is not False)
    stored_dropout = 0 if recomputed else t.lora_dropout
    wanted = fixed + shape.activation_bytes_per_token(False, lora_dropout=stored_dropout) * 16384
    checkpoints = 3 * 4 * lora * (t.keep_checkpoints + 1)  # weights + two AdamW moments, fp32, kept + one in flight
    if machine.gpu_free is None:
        host = HOST_BASE + base4 + 16 * lora + shape.activation_bytes_per_token(False) * length * 4
        p = StagePlan("train", "cpu", 0, int(host), int(checkpoints),
                      "4-bit base on the CPU" if t.load_in_4bit else "16-bit base on the CPU")
        return p
    p = StagePlan("train", "cuda", int(max(need, min(wanted, 0.9 * machine.gpu_free))), int(HOST_BASE + 2 * GiB),
                  int(checkpoints), f"{'NF4' if t.load_in_4bit else '16-bit'} base; "
                  f"micro-batch planned from the free memory")
    if need > machine.gpu_free:
        p.problem = (f"needs at least {need / GiB:.1f} GiB on the GPU for the "
                     f"{'4-bit' if t.load_in_4bit else '16-bit'} base and one packed row of {length} tokens, "
                     f"{machine.gpu_free / GiB:.1f} GiB free: use a larger GPU"
                     + ("" if t.load_in_4bit else ", or train.load_in_4bit=true")
                     + f", or a smaller train.lora_r (r={t.lora_r} takes {16 * lora / GiB:.1f} GiB with its "
                       f"gradients and optimizer state)"
                     + (", or a smaller train.packing_length" if length > 2048 else ""))
    return p


def _evaluate(cfg, shape: ModelShape, machine: Machine, base4: float, lora: int) -> StagePlan:
    """The same decision and batch as evaluate makes (job/predict.py inference_plan, plan_batch_size), from
    the same per-sequence estimate, so the plan says what the stage will do."""
    from job.predict import RESERVE_BYTES, sequence_bytes

    e = cfg.evaluate
    sequence = sequence_bytes(shape.config, PROMPT_TOKENS, e.max_new_tokens)
    choice = getattr(e, "model", "auto")
    if machine.gpu_free is None:
        host = HOST_BASE + 4 * shape.params + sequence * e.batch_size  # the merged model in fp32 on the CPU
        return StagePlan("evaluate", "cpu", 0, int(host), 0, f"merged model, fp32 on the CPU, batch {e.batch_size}")
    weights = {"merged": 2 * shape.params, "adapter": base4 + 2 * lora}
    if not cfg.merge.enabled:
        model = "adapter"
    elif choice in weights:
        model = choice
    else:  # auto: 16 bits when the weights and one sequence fit the free memory, else the model as trained
        model = "merged" if weights["merged"] + sequence + RESERVE_BYTES <= machine.gpu_free else "adapter"
    left = machine.gpu_free - weights[model]
    batch = max(1, min(e.batch_size, int(0.8 * max(0, left - RESERVE_BYTES // 3) // sequence)))
    how = {"merged": "merged 16-bit model", "adapter": "4-bit base + adapter (as trained)"}[model]
    if model == "adapter" and choice == "auto" and cfg.merge.enabled:
        how += ": the 16-bit model does not fit the GPU"
    need = weights[model] + RESERVE_BYTES + sequence * batch
    p = StagePlan("evaluate", "cuda", int(need), int(HOST_BASE + GiB), 0, f"{how}, batch {batch}")
    if batch < e.batch_size:
        p.notes.append(f"generation batch {batch} of evaluate.batch_size={e.batch_size}, from the memory left")
    if weights[model] + sequence + RESERVE_BYTES > machine.gpu_free:
        p.problem = (f"the {how.split(':')[0]} needs {(weights[model] + sequence + RESERVE_BYTES) / GiB:.1f} GiB on "
                     f"the GPU with one sequence, {machine.gpu_free / GiB:.1f} GiB free: evaluate on a larger GPU"
                     + (", or evaluate.model=auto" if choice == "merged" else "")
                     + ", or evaluate.enabled=false")
    return p


def _check_disk(plans: list[StagePlan], machine: Machine) -> None:
    total = 0
    for p in plans:
        total += p.disk_bytes
        if total > machine.disk_free and not p.problem:
            p.problem = (f"the run needs about {total / GiB:.1f} GiB of disk by the end of this stage, "
                         f"{machine.disk_free / GiB:.1f} GiB free in the cache: point JOB_CACHE_DIR (or "
                         f"model.cache_dir) at a larger disk"
                         + (", or fewer export.gguf types" if p.stage == "export" else ""))


def _check_host(plans: list[StagePlan], machine: Machine) -> None:
    for p in plans:
        if p.host_bytes > machine.host_available and not p.problem:
            hint = {"train": "train on a GPU, or a machine with more memory",
                    "evaluate": "evaluate on a GPU, or evaluate.enabled=false"}.get(p.stage,
                                                                                    "a machine with more memory")
            p.problem = (f"needs about {p.host_bytes / GiB:.1f} GiB of host memory, "
                         f"{machine.host_available / GiB:.1f} GiB available: {hint}")


def model_shape(model_dir: Path) -> ModelShape:
    return ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def run_stages(cfg) -> list[str]:
    """The stages a whole run of this config goes through (the disabled ones left out)."""
    names = ["format", "train"]
    names += ["merge"] if cfg.merge.enabled else []
    names += ["export"] if cfg.export.enabled and cfg.merge.enabled else []
    names += ["evaluate"] if cfg.evaluate.enabled else []
    return names


def local_model_dir(cfg) -> Path | None:
    """The model folder if it is on this machine already (a local folder, or a finished download in the
    cache), else None: the plan then waits for the train stage, which downloads it first."""
    from job.model import cached_model_dir

    return cached_model_dir(cfg.model.uri, cfg)


def cache_folder(cfg) -> Path:
    """Where downloads, the work folder and exports go: the disk the plan counts."""
    from job.platform import cache_dir

    return cache_dir(cfg)


def plan_for(cfg, model_dir: Path, stages: list[str], gpu: bool = True) -> tuple[list[StagePlan], Machine]:
    """The plan of `stages` on this machine now (after handing back what PyTorch keeps cached)."""
    if gpu:
        from job.platform import free_gpu_memory

        free_gpu_memory()  # what an earlier stage of this process left cached is free for the next
    machine = Machine.detect(cache_folder(cfg), gpu=gpu)
    return plan_stages(cfg, model_shape(model_dir), machine, stages), machine


def refuse_unless_fits(plans: list[StagePlan], machine: Machine, model_uri: str) -> None:
    """Exit 2 (before training) naming every stage that cannot fit, its numbers and the setting to change."""
    from job.errors import InputError

    problems = [f"{p.stage}: {p.problem}" for p in plans if p.problem]
    if problems:
        raise InputError(f"model.uri {model_uri} does not fit this machine ({machine.describe()}); "
                         f"refusing before training. " + " | ".join(problems))


def format_plan(plans: list[StagePlan], machine: Machine) -> list[str]:
    lines = [f"memory plan ({machine.describe()}):"]
    for p in plans:
        gpu = f"{p.gpu_bytes / GiB:5.1f} GiB GPU" if p.device == "cuda" else "    -    GPU"
        line = (f"  {p.stage + ':':<9} {p.device:<4} {gpu}  {p.host_bytes / GiB:5.1f} GiB host  "
                f"{p.disk_bytes / GiB:6.1f} GiB disk  {p.how}")
        lines.append(line + "".join(f"; {n}" for n in p.notes) + (f"  DOES NOT FIT: {p.problem}" if p.problem else ""))
    return lines


# The README's "How big a model fits" table: `python -m job.memory_plan` prints it from the formulas above.
MODEL_CLASSES = {
    "7B (Llama-2-7B)": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                            num_attention_heads=32, num_key_value_heads=32),
    "13B (Llama-2-13B)": dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, vocab_size=32000,
                              num_attention_heads=40, num_key_value_heads=40),
    "34B (CodeLlama-34B)": dict(hidden_size=8192, num_hidden_layers=48, intermediate_size=22016, vocab_size=32000,
                                num_attention_heads=64, num_key_value_heads=8),
    "70B (Llama-2-70B)": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, vocab_size=32000,
                              num_attention_heads=64, num_key_value_heads=8),
}
# A card's free memory once the driver and CUDA context have taken theirs (GiB), as mem_get_info reports it.
CARDS = {"12 GB": 11.5, "16 GB (T4)": 15.0, "24 GB (A10G, L4)": 22.0, "48 GB (L40S, A6000)": 46.0, "80 GB (H100)": 79.0}


def table(cfg) -> list[str]:
    rows = ["| model | card | train (GPU) | merge | export q8_0 | evaluate | host peak | disk |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, config in MODEL_CLASSES.items():
        shape = ModelShape.from_config(config)
        for card, free in CARDS.items():
            machine = Machine(gpu_free=int(free * GiB), gpu_total=int(free * GiB), host_available=2**50,
                              disk_free=2**50)
            plans = {p.stage: p for p in plan_stages(cfg, shape, machine, run_stages(cfg))}
            train, merge, evaluate = plans["train"], plans["merge"], plans["evaluate"]
            if train.problem:
                rows.append(f"| {model} | {card} | does not fit ({train.gpu_bytes / GiB:.0f} GiB needed) "
                            "| - | - | - | - | - |")
                continue
            check = "logits check on GPU" if "logits check on the GPU" in merge.notes else "per-tensor check only"
            ev = ("merged" if evaluate.how.startswith("merged") else "4-bit + adapter") + \
                 f", batch {evaluate.how.rsplit('batch ', 1)[1]}" if not evaluate.problem else "does not fit"
            host = max(p.host_bytes for p in plans.values())
            disk = sum(p.disk_bytes for p in plans.values())
            rows.append(f"| {model} | {card} | {train.gpu_bytes / GiB:.1f} GiB | streamed, {check} | "
                        f"{plans['export'].host_bytes / GiB:.1f} GiB host | {ev} | {host / GiB:.1f} GiB | "
                        f"{disk / GiB:.0f} GiB |")
    return rows


if __name__ == "__main__":
    from job.config import load_config

    print("\n".join(table(load_config(None, ("run_uri=/r", "data.uri=/d.csv", "model.uri=/m",
                                             "export.enabled=true")))))
