"""Models: loading (a stage's start, a checkpoint to evaluate, whole-weight folders) and LoRA /
QLoRA adapters."""
