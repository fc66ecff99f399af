"""Concept-level gradient projection, text mode: exactness, the certificate, attach/detach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_stable_diffusion, tiny_config, train_on_two_processes
from memguard import Trainer
from memguard.data.text import MiniLMEncoder
from memguard.defenses import ConceptProjection
from memguard.defenses.projection import concept_states, concept_subspace, guarded_weights
from memguard.models import build_unet
from test_trainer import assert_same_weights

CONCEPT = ("the acme logo",)


def test_subspace_is_orthonormal_and_spans_the_concept_states() -> None:
    encoder = MiniLMEncoder(max_length=16)
    basis = concept_subspace(encoder, list(CONCEPT), energy=0.99)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype))
    states = concept_states(encoder, CONCEPT[0]).double()
    residual = states - states @ basis @ basis.T
    assert residual.norm() ** 2 <= 0.011 * states.norm() ** 2  # 99% of the energy is kept
    smaller = concept_subspace(encoder, list(CONCEPT), energy=0.8)
    assert smaller.shape[1] < basis.shape[1]


def test_empty_subspace_equals_plain_training(shapes_dir: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain")).train()
    nothing = ConceptProjection(basis=torch.zeros(384, 0))
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "projected"), [nothing]).train()
    assert_same_weights(tmp_path / "plain", tmp_path / "projected")


class GradientOnly(ConceptProjection):
    """Projects gradients but not the update: what Adam and weight decay break."""

    def after_step(self, model, ctx) -> None:
        pass


def test_certificate_needs_the_update_reprojection(shapes_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(
        shapes_dir / "train", tmp_path / "full", max_text_length=16, adam_weight_decay=0.1
    )
    projection = ConceptProjection(concepts=CONCEPT)
    Trainer(config, [projection]).train()
    report = json.loads((tmp_path / "full" / "memguard.json").read_text())["defenses"]
    assert report["projection"]["leak"] <= 1e-5
    assert report["projection"]["guarded_weights"] == 8  # to_k, to_v of 4 cross-attentions
    gradient_only = GradientOnly(concepts=CONCEPT)
    config = tiny_config(
        shapes_dir / "train", tmp_path / "grad", max_text_length=16, adam_weight_decay=0.1
    )
    Trainer(config, [gradient_only]).train()
    assert gradient_only.leak() > 1e-3


def test_attach_then_detach_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, cross_attention_dim=384)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    projection = ConceptProjection(basis=torch.linalg.qr(torch.randn(384, 3))[0])
    projection.attach(unet, optimizer)
    with pytest.raises(RuntimeError, match="already attached"):
        projection.attach(unet, optimizer)
    projection.detach()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not optimizer._optimizer_step_post_hooks
    assert not any(p._post_accumulate_grad_hooks for p in unet.parameters())


def test_attached_to_a_plain_loop_the_concept_does_not_move() -> None:
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, cross_attention_dim=384)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=0.1)
    basis = torch.linalg.qr(torch.randn(384, 3, dtype=torch.float64))[0]
    projection = ConceptProjection(basis=basis).attach(unet, optimizer)
    before = {n: g.param.detach().clone() for n, g in guarded_weights(unet).items()}
    for _ in range(3):
        x, states = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 384)
        unet(
            x, torch.tensor([10, 500]), encoder_hidden_states=states
        ).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, guarded in guarded_weights(unet).items():
        weight = guarded.param
        moved = (weight.detach().double() - before[name].double()) @ basis
        assert moved.abs().max() < 1e-6, name
        assert not torch.equal(weight, before[name])  # it still learns off the subspace
    assert projection.leak() < 1e-5


def test_certificate_holds_on_two_processes(shapes_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(
        shapes_dir / "train",
        tmp_path / "two",
        train_batch_size=4,
        max_text_length=16,
        defense=("projection",),
        concept=CONCEPT,
    )
    done = train_on_two_processes(config)
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = json.loads((tmp_path / "two" / "memguard.json").read_text())
    assert metadata["num_processes"] == 2
    assert metadata["defenses"]["projection"]["leak"] <= 1e-5


def test_lora_adapters_are_projected(shapes_dir: Path, tmp_path: Path) -> None:
    pipeline = make_tiny_stable_diffusion(tmp_path / "sd")
    projection = ConceptProjection(concepts=CONCEPT)
    config = tiny_config(
        shapes_dir / "train",
        tmp_path / "lora",
        pretrained_model_name_or_path=str(pipeline),
        text_encoder="clip",
        resolution=16,
        lora_rank=4,
        max_train_steps=3,
        adam_weight_decay=0.1,
    )
    Trainer(config, [projection]).train()
    assert all(".lora_A." in name for name in projection.weights)
    assert projection.report()["leak"] <= 1e-5
