"""Image descriptors that users bring as TorchScript files: SSCD for copy detection (Pizzi et
al., "A Self-Supervised Descriptor for Image Copy Detection", CVPR 2022) and an Inception-v3
feature extractor for FID/KID on real data (Heusel et al., 2017).

memguard never downloads weights, and there is no CPU torchvision to build Inception from, so
both come as scripted modules from local paths (exported once with `torch.jit.script` or
`torch.jit.trace` wherever the original code runs). A module takes images (N, 3, S, S) in
[0, 1] and returns one descriptor per image; images are resized to S first. The network runs on
the device it is loaded to (the audit's), a batch at a time, and descriptors come back on the
CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def check_file(path: str | Path, flag: str) -> Path:
    """The path, or a FileNotFoundError naming the flag that gave it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file: {path}")
    return path


class ScriptedDescriptor(nn.Module):
    """A TorchScript descriptor behind a resize to its input size; (N, D) float features on the
    CPU, computed on `device`."""

    def __init__(
        self, path: str | Path, flag: str, size: int, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        path = check_file(path, flag)
        self.device = torch.device(device)
        try:
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as error:
            raise ValueError(f"{flag}: {path} is not a TorchScript module ({error})") from None
        self.size = size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Descriptors of any number of images, resized `batch_size` at a time (a training set
        resized to 299 px at once would not fit in memory)."""
        return torch.cat([self._describe(b) for b in images.split(batch_size)])

    def _describe(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:  # torchmetrics probes its feature size with uint8
            images = images.float() / 255.0
        images = images.to(self.device).float()
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear")
        return self.net(images).float().flatten(1).cpu()
