"""DDP fine-tuning on Ray Train: the driver, the per-worker loop, distributed helpers, the run directory."""
