"""Hosts: the objects a training run drives (ComfyUI's MODEL/CLIP/VAE, or a diffusers pipeline)."""
