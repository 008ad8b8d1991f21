"""Rank-elastic serving: one base model + one nested LoRA checkpoint, each request at its own rank."""
