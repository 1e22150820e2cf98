"""Text-encoder LoRAs: one in-memory form, readers for every published layout, a kohya writer."""
from .types import LoraFileError, LoraModule, LoraSet
from .read import read_lora
from .write import save_kohya, kohya_state_dict
from .fuse import fuse_loras

__all__ = ["LoraFileError", "LoraModule", "LoraSet", "read_lora", "save_kohya", "kohya_state_dict", "fuse_loras"]
