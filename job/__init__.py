"""A fine-tuning batch job: S3 dataset in, LoRA adapter, samples, report and manifest out."""

__version__ = "0.1.0"
