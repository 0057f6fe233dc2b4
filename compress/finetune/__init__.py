"""Fine-tuning on the shared trainer: full, partial (frozen patterns) and adapters (LoRA, QLoRA)."""
