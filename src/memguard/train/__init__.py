"""The training loop, its defense protocol and its checkpoints."""
