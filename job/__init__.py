"""qlora-job: fine-tune a causal language model with QLoRA as a resumable batch job."""

__version__ = "0.1.0"
