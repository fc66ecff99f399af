"""The audit of a model that reproduces its training images exactly: every replication figure
is known in advance (Gu et al.'s criterion in both conventions, IET's MQ, the images hit)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from memguard import audit
from memguard.config import AuditConfig
from memguard.data.folder import ImageFolderDataset, to_tensor
from memguard.data.text import MiniLMEncoder
from memguard.io import DiffusionModel
from memguard.models import noise_scheduler


class MemorizingUNet(torch.nn.Module):
    """The UNet interface the sampler uses, with the training set as its weights: for the
    training caption whose text state is nearest to the prompt's it predicts the exact noise
    of that caption's first training image x0, eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t),
    so that sampling returns x0. The empty caption's state (the unconditional half of a guided
    batch, laid out [unconditional; conditional] by the sampler) predicts as its conditional
    partner, so guidance leaves the prediction as it is."""

    def __init__(self, states: torch.Tensor, images: torch.Tensor, scheduler: DDPMScheduler):
        super().__init__()
        self.images = torch.nn.Parameter(images, requires_grad=False)  # (P, 3, S, S) in [-1, 1]
        self.register_buffer("states", states.flatten(1))  # (P + 1, L d): P captions, then ""
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone())
        self.config = SimpleNamespace(sample_size=images.shape[-1], in_channels=images.shape[1],
                                      cross_attention_dim=states.shape[-1])  # fmt: skip

    def forward(self, x: torch.Tensor, t, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        which = torch.cdist(encoder_hidden_states.flatten(1), self.states).argmin(dim=1)
        partner = (torch.arange(len(x), device=x.device) + len(x) // 2) % len(x)
        which = torch.where(which == len(self.images), which[partner], which)
        abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)  # t: one step, or one per sample
        return SimpleNamespace(sample=(x - abar.sqrt() * self.images[which]) / (1 - abar).sqrt())


@pytest.fixture(scope="module")
def memorized(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The audit (generic measures only) of a model that memorized the benchmark's training
    folder; the first training row of each caption, by caption."""
    train = ImageFolderDataset(shapes_dir / "train", 8)
    first = {}
    for i, caption in enumerate(train.captions):
        first.setdefault(caption, i)
    captions = list(first)
    encoder = MiniLMEncoder(max_length=32)  # no caption truncated: each state is its own
    config = noise_scheduler(1000, "squaredcos_cap_v2").config
    unet = MemorizingUNet(
        encoder.encode([*captions, ""]),
        torch.stack([to_tensor(train.pixels(first[c])) for c in captions]),
        DDPMScheduler.from_config(config),
    )
    model = DiffusionModel(unet, dict(config), encoder, vae=None, metadata={})
    folder = tmp_path_factory.mktemp("memorizing")
    output = tmp_path_factory.mktemp("audit")
    settings = AuditConfig(
        model=str(folder), train_data_dir=str(shapes_dir / "train"), output_dir=str(output),
        num_images=2, num_ordinary_prompts=3, num_inference_steps=3, detection_seeds=1,
        detection_steps=0, benchmark="off", device="cpu",
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(audit, "load_model", lambda path, device: model)
        results = audit.run_audit(settings)
    first_file = {c: train.records[i].path.name for c, i in first.items()}
    return output, results, first_file


def test_sampling_returns_the_training_images(memorized, shapes_dir: Path) -> None:
    output, results, first_file = memorized
    for row in (output / "samples" / "metadata.jsonl").read_text().splitlines():
        sample = json.loads(row)
        sampled = output / "samples" / sample["file_name"]
        memorized_image = shapes_dir / "train" / first_file[sample["text"]]
        with Image.open(sampled) as generated, Image.open(memorized_image) as trained:
            assert np.array_equal(np.array(generated), np.array(trained.convert("RGB")))


def test_replication_of_a_memorizing_model(memorized) -> None:
    _, results, first_file = memorized
    replication = results["replication"]
    kinds = replication["by_prompt_kind"]
    assert set(kinds) == {"duplicated", "ordinary"}
    duplicated, ordinary = kinds["duplicated"], kinds["ordinary"]
    # a copy of a duplicated image: a replica with copies merged; over every training row its
    # copies put d1 = d2 = 0, so it is not one (Gu et al.'s code)
    assert (duplicated["replica_rate"]["count"], duplicated["replica_rate"]["n"]) == (4, 4)
    assert duplicated["replica_rate_all_rows"]["count"] == 0
    # a copy of an image present once is a replica under both conventions
    for name in ("replica_rate", "replica_rate_all_rows", "own_replica_rate"):
        assert (ordinary[name]["count"], ordinary[name]["n"]) == (6, 6), name
    assert duplicated["own_replica_rate"]["count"] == 4
    for generation in replication["generations"]:
        assert generation["ratio"] == 0.0 and generation["iet_mq"] == 0.0
        assert generation["mq_distinct_l2"] == 0.0
        assert generation["ratio_all_rows"] == (1.0 if generation["kind"] == "duplicated" else 0)
        assert generation["nearest_file"] == first_file[generation["prompt"]]
    for name in ("iet_mq", "mq_distinct_l2"):
        below = replication["mq"][name]["fraction_below"]["0.15"]
        assert (below["count"], below["n"]) == (10, 10)
    prompts = [p["prompt"] for p in replication["prompts"]]
    assert {hit["file_name"]: hit["replicas"] for hit in replication["most_replicated"]} == {
        first_file[p]: 2 for p in prompts
    }
    assert all(hit["caption"] in prompts for hit in replication["most_replicated"])
    # the prompt does not change the prediction, so Wen et al.'s d(p) is 0 for every prompt
    assert [s["d"] for s in results["detection"]["scores"]] == [0.0] * 5
    assert results["detection"]["auc"] == 0.5 and "benchmark" not in results
