"""Train nested (Matryoshka) LoRA adapters that serve at any rank in R = {1, 2, 4, …, r}."""

from trainer.checkpoint import CheckpointError, load_adapter, read_meta, save_adapter
from trainer.inject import AdapterConfig, NestedAdapter
from trainer.nested import NestedLoRALinear, p_vector, scale

__all__ = ["AdapterConfig", "CheckpointError", "NestedAdapter", "NestedLoRALinear", "load_adapter",
           "p_vector", "read_meta", "save_adapter", "scale"]
