"""Minimal Qwen2-style decoder, its numpy reference, CUDA model and trainer (see the model issue)."""
