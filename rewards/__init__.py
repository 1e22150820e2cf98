"""Reward functions: images (B×H×W×C, 0..1) and prompts in, one score per image out. Never imports ComfyUI."""
