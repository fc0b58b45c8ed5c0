"""The five stages, declared in order with what each depends on.

Stage modules are imported lazily: `job plan` and `job config` must not pay for importing torch.
"""

from __future__ import annotations

from job import layout
from job.config import Config
from job.hub_uri import is_hf_uri
from job.input_identity import file_identity
from job.pipeline import Stage

# How often to log or checkpoint changes nothing in the adapter: changing them keeps a run resumable.
OPERATIONAL_TRAIN_KEYS = ("train.checkpoint_every_steps", "train.checkpoint_every_minutes", "train.keep_checkpoints",
                          "train.background_upload", "train.logging_steps", "train.dataloader_workers",
                          "train.distributed_timeout_minutes", "train.report_to",
                          # the same forward and gradients, recomputed instead of stored (job/lora_dropout.py)
                          # or computed without peft's copies (job/fused_lora.py)
                          "train.recompute_lora_dropout", "train.fused_lora")

# Where the merge runs, how its files are sharded and how strictly it is checked leave the weights as they are.
OPERATIONAL_MERGE_KEYS = ("merge.device", "merge.max_shard_size", "merge.check_prompts", "merge.tolerance")
# The batch size changes speed and memory, not what greedy decoding says (up to padding rounding): a
# run that ran out of memory can go on with a smaller batch without being called stale.
OPERATIONAL_EVALUATE_KEYS = ("evaluate.batch_size",)
OPERATIONAL_EXPORT_KEYS = ("export.check_prompts", "export.min_agreement")


def hub_identity(cfg: Config, uri: str):
    """The commit an hf:// URI names now (job/hub.py), or None when the hub cannot say."""
    from job.hub import revision_identity
    from job.platform import cache_dir

    return revision_identity(uri, cache_dir(cfg))


def _lazy(module: str):
    def run(cfg, ctx):
        import importlib

        return importlib.import_module(f"job.stages.{module}").run(cfg, ctx)

    return run


def all_stages() -> list[Stage]:
    return [
        # The CSV's identity (content hash, or ETag and version) is part of format's fingerprint: the same
        # data.uri with other content makes format stale.
        Stage("format", _lazy("format"), config_keys=("data", "prompt"), outputs=(layout.DATA,),
              inputs=lambda c: {"data.uri": hub_identity(c, c.data.uri) if is_hf_uri(c.data.uri)
                                else file_identity(c.data.uri, c.storage)}),
        # storage settings and cache folders change where bytes travel, not the result: not in the keys.
        Stage("train", _lazy("train"), config_keys=("model.uri", "model.attn_implementation", "train"),
              ignore=OPERATIONAL_TRAIN_KEYS, needs=("format",),
              outputs=(layout.ADAPTER, layout.CHECKPOINTS, layout.TENSORBOARD),
              # hf://ORG/NAME@branch: the commit it names now (a moved branch makes train stale); {} otherwise
              inputs=lambda c: {"model.uri": hub_identity(c, c.model.uri)} if is_hf_uri(c.model.uri) else {},
              all_ranks=True),  # data-parallel: every GPU process of a multi-GPU run trains
        # The merged weights depend on the adapter (train) and merge.dtype only.
        Stage("merge", _lazy("merge"), config_keys=("merge",), ignore=OPERATIONAL_MERGE_KEYS, needs=("train",),
              outputs=(layout.MERGED,), enabled=lambda c: c.merge.enabled, disabled_reason="merge.enabled: false"),
        # GGUF files from merged/ (off by default). How strictly they are checked leaves the files as they are.
        Stage("export", _lazy("export"), config_keys=("export",), ignore=OPERATIONAL_EXPORT_KEYS, needs=("merge",),
              outputs=(layout.EXPORT,), enabled=lambda c: c.export.enabled and c.merge.enabled,
              disabled_reason=lambda c: "merge.enabled: false" if c.export.enabled else "export.enabled: false"),
        # Reads merged/ (or adapter/ when merge is disabled) and data/eval.jsonl (format, via train); the
        # report shows the export check when the export is enabled.
        Stage("evaluate", _lazy("evaluate"), config_keys=("evaluate",), ignore=OPERATIONAL_EVALUATE_KEYS,
              needs=("train", "merge", "export"), outputs=(layout.REPORT,), enabled=lambda c: c.evaluate.enabled,
              disabled_reason="evaluate.enabled: false"),
    ]

