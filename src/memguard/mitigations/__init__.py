"""Mitigations applied to a trained model: pruning what makes memorized prompts replicate
(`pruning.py`: NeMo, Hintersdorf et al., NeurIPS 2024; Wanda, Sun et al., ICLR 2024)."""
