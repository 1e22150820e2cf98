"""Host-agnostic core of TexForce: LoRA math and files, the RL loop. Never imports ComfyUI."""
