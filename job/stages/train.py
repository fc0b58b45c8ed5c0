"""Train stage: data/train.jsonl -> adapter/, with checkpoints in object storage and resume.

setup (model, tokenizer, data) -> check the labels -> train (checkpoints uploaded as they are made)
-> save the adapter. A rerun continues from checkpoints/LATEST; SIGTERM ends in a checkpoint and
exit 75. The trainer is trl's SFTTrainer: loss on the completion only, packing without
cross-example attention (padding-free, position ids), EOS at the end of every example, trained on.

Multi-GPU (torchrun/accelerate, see job/distributed.py): every process runs this stage with its own
4-bit model copy on its own GPU; the Trainer wraps it in DDP and gives each process its own shard of
the packed rows. One process per machine downloads the model and the resume checkpoint; rank 0
alone uploads checkpoints and the adapter. The effective batch is micro batch x
train.gradient_accumulation x the number of processes.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from job import distributed, hub, memory_plan
from job.config import Config
from job.dtypes import dtype_name, pick_dtype
from job.errors import InputError, JobError, Preempted
from job.fused_lora import choose_fused_lora, fuse_lora_layers
from job.layout import ADAPTER, CHECKPOINTS, TENSORBOARD, TRAIN_DATA
from job.liger import KernelPatches, apply_liger, choose_liger
from job.lora_dropout import choose_recompute, fold_lora_dropout
from job.model import fetch_model, load_tokenizer, training_attention
from job.peaks import reset_gpu_peak
from job.platform import keep_compiled_kernels
from job.run_files import read_jsonl
from job.stages.checkpoints import CheckpointSync, ResumePoint, find_resume_checkpoint
from job.stages.labels import check_labels, tokenize_examples
from job.stages.train_checks import check_packing, check_target_modules
from job.trackers import tracker_callbacks


@dataclass
class TrainingSetup:
    """What `set_up` prepared: the model, the data, where training resumes and how it is batched."""

    model_dir: Path
    model_revision: Optional[str]
    """hf://...: the commit sha it resolved to (None for other model URIs)."""
    tokenizer: object
    examples: object
    """job.stages.labels.Examples: the tokenized dataset and the rows dropped as too long."""
    dtype: object
    resume: Optional[ResumePoint]
    kernels: dict
    settings: dict
    """The batch plan (plan_batch), or the one the resumed run started with."""
    quantized: int
    trainer: object
    label_report: dict


def run(cfg: Config, ctx) -> dict:
    """set up (model, data, resume point, batch plan, trainer) -> train -> save and upload the adapter."""
    keep_compiled_kernels(cfg)
    # Liger's kernels patch transformers' classes for the whole process: undone when training ends, so the
    # merge and evaluate models that follow in this process run transformers' own code (on CPU too).
    with KernelPatches() as patches:
        with ctx.timer("setup"):
            setup = set_up(cfg, ctx, patches)
        train(setup, ctx)
    if patches.restored:
        ctx.log.info("train: kernel patches undone for the stages that follow (%d names, e.g. %s)",
                     len(patches.restored), ", ".join(patches.restored[:3]))
    stop_if_preempted(setup.trainer, ctx)
    replicas = check_replicas(setup.trainer.model, ctx.ranks)
    if not ctx.ranks.is_main:
        return {}  # rank 0 saves and uploads the adapter and writes the marker
    with ctx.timer("save"):
        save_adapter(setup, ctx)
    return train_metrics(cfg, ctx, setup, replicas)


def set_up(cfg: Config, ctx, patches: KernelPatches | None = None) -> TrainingSetup:
    """The base model (one download per machine), the tokenized data, the checkpoint to resume from,
    the kernels and batch plan, the 4-bit model and the trainer, with every check before the first step.
    Kernel patches are recorded in `patches`, to be undone after training."""
    import torch

    ranks = ctx.ranks
    with distributed.local_main_first(ranks):  # one download per machine; the others reuse the cache
        model_dir = fetch_model(cfg.model.uri, cfg)
    check_memory_plan(cfg, ctx, model_dir)
    model_revision = hub.resolved_revision(cfg.model.uri, model_dir)
    tokenizer = load_tokenizer(model_dir, cfg.model.uri)
    records = read_jsonl(ctx.store, TRAIN_DATA, "format", keys=("prompt", "completion"))
    examples = tokenize_examples(records, tokenizer, cfg.train.max_seq_length)
    ctx.log.info("train: %d examples tokenized, %d dropped as longer than train.max_seq_length=%d",
                 len(examples.dataset), len(examples.dropped_rows), cfg.train.max_seq_length)

    dtype, dtype_reason = pick_dtype(cfg.train.compute_dtype, "train")
    resume = find_resume_checkpoint(ctx.store, ctx.fingerprint, ctx.work_dir / "resume", ctx.log, ranks)
    kernels = choose_kernels(cfg, model_dir)
    ctx.log.info("train: attention %s (%s); Liger kernels %s (%s)", kernels["attention"],
                 kernels["attention_reason"], "on" if kernels["liger"] else "off", kernels["liger_reason"])
    settings = batch_settings(cfg, ctx, examples, model_dir, kernels, resume)
    ctx.log.info("train: %s, compute dtype %s (%s), %s", "4-bit NF4 base (QLoRA)" if cfg.train.load_in_4bit
                 else "16/32-bit base (LoRA)", dtype_name(dtype), dtype_reason, settings)
    check_packing(settings, [len(ids) for ids in examples.dataset["input_ids"]], cfg.train.max_seq_length)

    model = load_base_model(cfg, model_dir, dtype, kernels, patches)
    check_target_modules(model, cfg.train.target_modules, cfg.model.uri)  # before PEFT, before the first step
    quantized = count_4bit_layers(model)
    ctx.log.info("train: base model loaded: %d 4-bit (bitsandbytes Linear4bit) layers, %.2f GiB%s", quantized,
                 model.get_memory_footprint() / 2**30,
                 f" on {torch.cuda.get_device_name()}" if torch.cuda.is_available() else " on CPU")
    trainer = build_trainer(cfg, ctx, model, tokenizer, examples.dataset, dtype, settings)
    fused, dropout = trainer.fused_lora, trainer.lora_dropout_recompute
    ctx.log.info("train: fused LoRA %s (%s); LoRA dropout %s (%s)",
                 f"on in {fused['layers']} layers" if fused["used"] else "off, peft's forward", fused["reason"],
                 f"recomputed in the backward pass in {dropout['layers']} layers" if dropout["used"] else "stored",
                 dropout["reason"])
    label_report = check_labels(trainer, tokenizer)
    ctx.log.info("train: label check passed on %d examples (%d supervised tokens, EOS supervised in each)",
                 label_report["examples"], label_report["supervised_tokens"])
    if resume is not None:
        trainer.checkpoint_sync.last_uploaded_step = resume.step
    return TrainingSetup(model_dir, model_revision, tokenizer, examples, dtype, resume, kernels, settings,
                         quantized, trainer, label_report)


def check_memory_plan(cfg: Config, ctx, model_dir: Path) -> None:
    """This stage and the ones after it must fit this machine (job/memory_plan.py): refused with exit 2
    before the model loads. The pipeline checked already when the model was on this machine at the start."""
    plans, machine = memory_plan.plan_for(cfg, model_dir, memory_plan.run_stages(cfg)[1:])
    if ctx.memory.get("plan") is None:  # not planned at the start: the model had to be downloaded first
        for line in memory_plan.format_plan(plans, machine):
            ctx.log.info("%s", line)
    ctx.memory["plan"] = plans[0].record()
    memory_plan.refuse_unless_fits(plans, machine, cfg.model.uri)


def batch_settings(cfg: Config, ctx, examples, model_dir: Path, kernels: dict, resume) -> dict:
    """Rank 0's batch plan on every GPU; a resumed run keeps the plan it started with."""
    settings = distributed.broadcast(plan_batch(cfg, examples, model_dir, kernels))
    ranks = ctx.ranks
    if resume is not None and ranks.distributed and resume.processes != ranks.world_size:
        ctx.log.warning("train: the checkpoint was made by %d processes, this run has %d: the effective batch "
                        "and the data order change from here on", resume.processes, ranks.world_size)
    if resume is not None and resume.settings and resume.settings != settings:
        ctx.log.info("train: keeping the settings the run started with %s (this card would pick %s)",
                     resume.settings, settings)
        settings = resume.settings
    return settings


def train(setup: TrainingSetup, ctx) -> None:
    """Train from the resume point to the last step (timed as the "train" phase)."""
    import torch

    if torch.cuda.is_available():
        reset_gpu_peak()  # the stage's own peak is kept (job/peaks.py)
    trainer, resume = setup.trainer, setup.resume
    with ctx.timer("train"):
        finished = finished_state(resume.path) if resume is not None else None
        if finished is None:
            trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
            return
        # LATEST is the last step: the run was killed after it was published, before the train marker
        # (during the adapter upload, say). trainer.train() would still run one more step before it
        # checks max_steps (the adapter would differ from an uninterrupted run's, and gain a step per
        # such kill), so take the checkpoint's weights and state as they are.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(trainer.model, load_file(resume.path / "adapter_model.safetensors"))
        trainer.state = finished
        ctx.log.info("train: checkpoint %d is the last step: nothing left to train", finished.global_step)


def stop_if_preempted(trainer, ctx) -> None:
    """After SIGTERM the trainer stopped at a step boundary: upload that checkpoint, then exit 75."""
    if ctx.stop is None or not ctx.stop.is_set():
        return
    saved = trainer.checkpoint_sync.finish()
    waited = time.monotonic() - ctx.stop.received_at
    ctx.log.warning("train: stopped by SIGTERM at step %d; checkpoint uploaded %.1f s after the signal",
                    trainer.state.global_step, waited)
    raise Preempted(f"stopped by SIGTERM at step {trainer.state.global_step}: checkpoint "
                    f"{saved} uploaded {waited:.1f} s after the signal; rerun to resume")


def save_adapter(setup: TrainingSetup, ctx) -> None:
    """adapter/ (weights and tokenizer) replaces the run's, after the last checkpoint upload; then the
    tensorboard logs."""
    adapter_dir = ctx.work_dir / ADAPTER
    shutil.rmtree(adapter_dir, ignore_errors=True)
    setup.trainer.model.save_pretrained(adapter_dir)
    setup.tokenizer.save_pretrained(adapter_dir)
    setup.trainer.checkpoint_sync.finish()
    ctx.store.delete(ADAPTER)
    ctx.store.upload_dir(adapter_dir, ADAPTER)
    setup.trainer.checkpoint_sync.upload_tensorboard()


def train_metrics(cfg: Config, ctx, setup: TrainingSetup, replicas: list[str]) -> dict:
    """The train marker's metrics (README "Run layout"; the report's train section reads them)."""
    import torch

    state, resume, examples = setup.trainer.state, setup.resume, setup.examples
    losses = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    session_tokens = state.num_input_tokens_seen - (resume.tokens_seen if resume else 0)
    train_seconds = ctx.phases.get("train", 0.0)
    return {
        "steps": state.global_step,
        "resumed_from_step": resume.step if resume else None,
        "examples": len(examples.dataset),
        "dropped_too_long": len(examples.dropped_rows),
        "dropped_rows_sample": examples.dropped_rows[:20],
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": round(session_tokens / train_seconds, 1) if train_seconds > 0 else None,
        "train_seconds": round(train_seconds, 1),
        "stage_seconds": round(ctx.elapsed(), 1),
        "final_loss": losses[-1]["loss"] if losses else None,
        "loss_curve": losses,
        "peak_gpu_memory_gb": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                               if torch.cuda.is_available() else None),
        "model_revision": setup.model_revision,
        "load_in_4bit": cfg.train.load_in_4bit,
        "quantized_linear_layers": setup.quantized,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "compute_dtype": dtype_name(setup.dtype),
        "settings": setup.settings,
        "attention": {"implementation": setup.kernels["attention"], "reason": setup.kernels["attention_reason"]},
        "liger": {"used": setup.kernels["liger"], "reason": setup.kernels["liger_reason"]},
        "fused_lora": setup.trainer.fused_lora,
        "recompute_lora_dropout": setup.trainer.lora_dropout_recompute,
        "label_check": setup.label_report,
        "checkpoints_uploaded": setup.trainer.checkpoint_sync.uploaded_steps,
        "processes": ctx.ranks.world_size,
        "replica_digests": replicas,
    }


def check_replicas(model, ranks) -> list[str]:
    """Digest of the trained LoRA weights on every process: DDP keeps the copies identical, and a
    run whose copies drifted apart (a rank that skipped a step, a broken all-reduce) must not pass."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    digests = distributed.gather(digest.hexdigest()[:16])
    if len(set(digests)) > 1:
        raise JobError(f"train: the {len(digests)} GPU processes ended with different LoRA weights {digests}; "
                       "the adapter is not saved (rerun; report this if it repeats)")
    return digests


def finished_state(checkpoint: Path):
    """The checkpoint's TrainerState when it holds the last step of the run, else None."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return state if 0 < state.max_steps <= state.global_step else None


def choose_kernels(cfg: Config, model_dir: Path) -> dict:
    """The attention implementation and whether Liger kernels are used, each with the reason (logged,
    kept in the marker, and used by plan_batch: both change the memory a token costs)."""
    attention, attention_reason = training_attention(cfg)
    liger, liger_reason = choose_liger(cfg, model_dir)
    return {"attention": attention, "attention_reason": attention_reason, "liger": liger,
            "liger_reason": liger_reason}


def plan_batch(cfg: Config, examples, model_dir: Path, kernels: dict | None = None) -> dict:
    """Micro-batch size, packing length and activation checkpointing: from config, or sized to the card.

    Measured on an H200 with a 7B model (docs/benchmarks.md), flex attention: without activation
    checkpointing, 8k tokens per micro-batch give 11,240 tokens/s at 63 GiB and 16k give 12,141 at
    121 GiB; with checkpointing, 32k give 8,817 at 22 GiB. So: no checkpointing when at least 8k
    tokens fit (up to 16k), else checkpointing with up to 32k tokens per micro-batch (bitsandbytes
    dequantizes every weight once per micro-batch: more tokens amortise it). With sdpa (the
    default then) the micro-batch stays at 8k tokens: 5,391 tokens/s at 67 GiB without checkpointing.
    varlen (the default on CUDA) is like flex: no mask, attention memory linear in the tokens; measured
    (H200, 7B, NF4): 2048 x 8 without checkpointing 121 GiB peak, 102 GiB with Liger; capped at
    80 GiB this plan gives 2048 x 4 (62.7 GiB), at 16 GiB 2048 x 6 with checkpointing (11 GiB).

    Bytes per token of a micro-batch (bf16), calibrated on that run: without checkpointing every
    layer keeps about 14*hidden + 5*intermediate values (LoRA dropout 0.1, no Liger); with it, each
    layer keeps its input (hidden) and one layer's activations are live; the logits add 8*vocab bytes
    (fp32 and grad). Measured savings without checkpointing, per layer and token: Liger's RMSNorm and
    SwiGLU about 2*hidden + intermediate values (121 -> 102 GiB at 16k tokens), train.lora_dropout=0
    about 6*hidden + intermediate (the dropped copies of the LoRA inputs: 121 -> 88 GiB), counted as
    5*hidden + intermediate: with Liger on an H100 a recomputed dropout measured 4.19 MB a token, not the
    3.94 that 6*hidden gives, and that plan ran out of memory under a 40 GiB cap.
    """
    import torch

    t = cfg.train
    longest = max(len(ids) for ids in examples.dataset["input_ids"])
    settings = {"packing": t.packing}
    if not torch.cuda.is_available():
        length = max(longest, min(t.max_seq_length, 512)) if t.packing else t.max_seq_length
        settings.update(packing_length=t.packing_length if t.packing_length != "auto" else length,
                        micro_batch_size=t.micro_batch_size if t.micro_batch_size != "auto" else 4,
                        gradient_checkpointing=bool(t.gradient_checkpointing is True))
        return settings

    shape = memory_plan.model_shape(model_dir)
    params = shape.layers * (4 * shape.hidden * shape.hidden + 3 * shape.hidden * shape.intermediate) \
        + 2 * shape.vocab * shape.hidden
    base_bytes = params * (0.55 if t.load_in_4bit else 2.0)
    free = usable_gpu_memory()
    budget = 0.90 * free - base_bytes - 1.5 * 2**30  # LoRA weights, optimizer state, CUDA context, workspace
    kernels = kernels if kernels is not None else choose_kernels(cfg, model_dir)
    # Without checkpointing, a LoRA dropout drawn again in the backward pass (by job/fused_lora.py, or
    # job/lora_dropout.py's fold) stores what dropout 0 stores.
    recomputed = choose_recompute(cfg, False, choose_fused_lora(cfg)[0])[0]
    stored_dropout = {False: 0 if recomputed else t.lora_dropout, True: t.lora_dropout}
    per_token = {ckpt: shape.activation_bytes_per_token(ckpt, kernels["liger"], stored_dropout[ckpt])
                 for ckpt in (False, True)}
    length = t.packing_length if t.packing_length != "auto" else max(2048, longest)
    if not t.packing:
        length = t.max_seq_length
    dense_mask = kernels["attention"] in ("sdpa", "eager")
    fit = {ckpt: int(max(budget, 0) // per_token[ckpt]) for ckpt in (False, True)}
    if t.gradient_checkpointing == "auto":
        checkpointing = fit[False] < 8192
    else:
        checkpointing = bool(t.gradient_checkpointing)
    # A dense document mask (sdpa, eager) costs the square of the micro-batch's tokens: stay at 8k.
    target = 8192 if dense_mask else (32768 if checkpointing else 16384)
    if t.micro_batch_size == "auto":
        micro = max(1, min(target, fit[checkpointing]) // length)
    else:
        micro = t.micro_batch_size
    settings.update(packing_length=length, micro_batch_size=micro, gradient_checkpointing=checkpointing,
                    usable_gpu_memory_gb=round(free / 2**30, 1))
    return settings


def usable_gpu_memory() -> int:
    """Free bytes on the current GPU, within any per-process cap (set_per_process_memory_fraction)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return int(min(free, fraction * total - torch.cuda.memory_reserved()))


def count_4bit_layers(model) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def load_base_model(cfg: Config, model_dir: Path, dtype, kernels: dict | None = None,
                    patches: KernelPatches | None = None):
    """The base model for training, with the chosen attention (choose_kernels) and Liger's kernels if used
    (what they patch in transformers recorded in `patches`, to be undone after training)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kernels = kernels if kernels is not None else choose_kernels(cfg, model_dir)
    kwargs = {"dtype": dtype, "attn_implementation": kernels["attention"]}
    if cfg.train.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.train.quant_type,
            bnb_4bit_use_double_quant=cfg.train.double_quant, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"model.uri {cfg.model.uri}: cannot load the model: {exc}") from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if kernels["liger"]:
        apply_liger(model, patches)  # before LoRA wraps the layers: it patches the norms and MLPs in place
    return model


def build_trainer(cfg: Config, ctx, model, tokenizer, dataset, dtype, settings):
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from job.logs import progress_bars
    from job.progress import use_progress_log

    t = cfg.train
    on_cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(ctx.work_dir / CHECKPOINTS),
        per_device_train_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        optim=t.optimizer if t.optimizer != "auto" else ("adamw_torch_fused" if on_cuda else "adamw_torch"),
        bf16=dtype == torch.bfloat16 and on_cuda,
        fp16=dtype == torch.float16 and on_cuda,
        **activation_checkpointing_args(SFTConfig, settings["gradient_checkpointing"]),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.checkpoint_every_steps > 0 else "no",
        save_steps=t.checkpoint_every_steps if t.checkpoint_every_steps > 0 else 500,
        save_total_limit=None,  # rotation happens after upload (CheckpointSync), never under an upload
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",  # trackers are added below (job/trackers.py): guarded, never prompting
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=t.dataloader_workers,
        max_length=settings["packing_length"] if t.packing else t.max_seq_length,
        packing=t.packing,
        packing_strategy="bfd",
        padding_free=t.packing,
        completion_only_loss=True,
        dataset_num_proc=None,
        use_cpu=not on_cuda,
        disable_tqdm=not (ctx.ranks.is_main and progress_bars()),  # else one log line per step (job/progress.py)
        # LoRA leaves every trainable parameter in the graph; searching for unused ones costs a pass.
        ddp_find_unused_parameters=False,
        ddp_timeout=int(t.distributed_timeout_minutes * 60),
    )
    peft_config = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                             target_modules=t.target_modules, task_type="CAUSAL_LM", bias="none")
    sync = CheckpointSync(ctx.store, ctx.fingerprint, keep=t.keep_checkpoints,
                          every_minutes=t.checkpoint_every_minutes, background=t.background_upload,
                          stop=ctx.stop, tensorboard_dir=ctx.work_dir / TENSORBOARD, log=ctx.log,
                          settings=settings, ranks=ctx.ranks)
    callbacks = [sync]
    if ctx.ranks.is_main:  # one tracker run: rank 0 logs the loss the Trainer averaged over ranks
        callbacks += tracker_callbacks(t.report_to, ctx, ctx.work_dir / TENSORBOARD)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    trainer.checkpoint_sync = sync
    fused, fused_reason = choose_fused_lora(cfg)
    recompute, reason = choose_recompute(cfg, settings["gradient_checkpointing"], fused)
    if fused:  # the fused function draws the dropout again itself (job/fused_lora.py)
        layers = fuse_lora_layers(trainer.model, recompute_dropout=recompute)
        dropped = layers if recompute else 0
    else:
        layers, dropped = 0, fold_lora_dropout(trainer.model) if recompute else 0
    trainer.fused_lora = {"used": fused, "reason": fused_reason, "layers": layers}
    trainer.lora_dropout_recompute = {"used": recompute, "reason": reason, "layers": dropped}
    use_progress_log(trainer, ctx.log, sync, bars=ctx.ranks.is_main and progress_bars())
    return trainer


def activation_checkpointing_args(config_class, enabled: bool) -> dict:
    """transformers 5.2x renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)`
    and warns about the old names; 5.17 (the GPU image) knows only the old ones. Use the name this
    TrainingArguments has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
