"""Checkpoint conversion between our megatron checkpoints and Hugging Face directories."""
