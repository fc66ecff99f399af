"""Concept-level gradient projection in text, feature and image mode (patch mode in
test_projection_patch.py, beside its attach/detach here): exactness, the certificate,
attach/detach, strength zero, resume, the subspaces, and the settings of each mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from helpers import (
    make_tiny_stable_diffusion,
    tiny_config,
    tiny_run,
    tiny_settings,
    train_on_two_processes,
)
from memguard import Trainer
from memguard.config import ConfigError
from memguard.data.shapes import stamp_logo
from memguard.data.text import MiniLMEncoder
from memguard.defenses import (
    FeatureProjection,
    ImageProjection,
    PatchProjection,
    TextProjection,
    rebuild,
)
from memguard.defenses.concept_detector import PatchDetector
from memguard.defenses.feature_subspace import (
    basis_from_gram,
    concept_feature_bases,
    concept_footprint,
    feature_layers,
    layer_rows,
)
from memguard.defenses.projection_text import concept_states, concept_subspace, guarded_weights
from memguard.defenses.subspace import energy_basis, rows_of
from memguard.models import build_unet
from test_trainer import WEIGHTS, assert_same_weights

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


def defense_records(output_dir: Path) -> dict[str, dict]:
    """memguard.json's defense records, by name."""
    records = json.loads((output_dir / "memguard.json").read_text())["defenses"]
    return {record["name"]: record for record in records}


def empty_projection(mode: str) -> TextProjection | FeatureProjection | ImageProjection:
    """A projection of each mode at strength zero: subspaces with no direction."""
    if mode == "text":
        return TextProjection(basis=torch.zeros(384, 0))
    if mode == "image":
        return ImageProjection(basis=torch.zeros(3 * 8 * 8, 0))
    unet = build_unet("tiny", 8, cross_attention_dim=384)
    bases = {
        name: torch.zeros(rows_of(module.weight).shape[1], 0)
        for name, module in feature_layers(unet).items()
    }
    return FeatureProjection(bases=bases, refresh_steps=0)


@pytest.mark.parametrize("mode", ["text", "feature", "image"])
def test_strength_zero_equals_plain_training(mode: str, shapes_dir: Path, tmp_path: Path):
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "plain")).train()
    nothing = empty_projection(mode)
    Trainer(tiny_config(shapes_dir / "train", tmp_path / "projected"), [nothing]).train()
    assert_same_weights(tmp_path / "plain", tmp_path / "projected")


class GradientOnly(TextProjection):
    """Projects gradients but not the update: what Adam and weight decay break."""

    def after_step(self, model, ctx) -> None:
        pass


def test_certificate_needs_the_update_reprojection(shapes_dir: Path, tmp_path: Path) -> None:
    config, (projection,) = tiny_run(
        shapes_dir / "train", tmp_path / "full", max_text_length=16, adam_weight_decay=0.1,
        defense=("projection",), concept=CONCEPT,
    )  # fmt: skip
    Trainer(config, [projection]).train()
    report = defense_records(tmp_path / "full")["projection"]["report"]
    assert report["leak"] <= 1e-5
    assert report["guarded_weights"] == 8  # to_k, to_v of 4 cross-attentions
    gradient_only = GradientOnly(concept=CONCEPT)
    config = tiny_config(
        shapes_dir / "train", tmp_path / "grad", max_text_length=16, adam_weight_decay=0.1
    )
    Trainer(config, [gradient_only]).train()
    assert gradient_only.leak() > 1e-3


def _sgd_steps(unet, optimizer, steps: int = 2, locate=None) -> None:
    """SGD steps on random inputs; `locate` (patch mode's) is shown each batch first."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=generator)
        if locate is not None:
            locate(x)
        states = torch.randn(2, 4, 384, generator=generator)
        unet(
            x, torch.tensor([10, 500]), encoder_hidden_states=states
        ).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("mode", ["text", "image", "patch"])
def test_attach_then_detach_leaves_the_model_untouched(mode: str) -> None:
    """Attached, the projection changes training; detached, the model is bit-identical and the
    same steps train it exactly as if it had never been attached."""

    def fresh():
        torch.manual_seed(0)
        unet = build_unet("tiny", 8, cross_attention_dim=384)
        return unet, torch.optim.SGD(unet.parameters(), lr=1e-2)

    generator = torch.Generator().manual_seed(0)
    if mode == "text":
        projection = TextProjection(
            basis=torch.linalg.qr(torch.randn(384, 3, generator=generator))[0]
        )
    elif mode == "image":
        projection = ImageProjection(
            basis=torch.linalg.qr(torch.randn(192, 5, generator=generator))[0]
        )
    else:  # a random detector, at a threshold that finds something in most images
        torch.manual_seed(2)
        projection = PatchProjection(detector=PatchDetector(3), threshold=0.0)
    unet, optimizer = fresh()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    projection.attach(unet, optimizer)
    with pytest.raises(RuntimeError, match="already attached"):
        projection.attach(unet, optimizer)
    projection.detach()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert not optimizer._optimizer_step_post_hooks and not unet._forward_hooks
    assert not any(p._post_accumulate_grad_hooks for p in unet.parameters())
    _sgd_steps(unet, optimizer)
    plain, plain_optimizer = fresh()
    _sgd_steps(plain, plain_optimizer)
    assert all(
        torch.equal(a, b) for a, b in zip(unet.parameters(), plain.parameters(), strict=True)
    )
    defended, defended_optimizer = fresh()
    projection.attach(defended, defended_optimizer)
    _sgd_steps(defended, defended_optimizer, locate=getattr(projection, "locate", None))
    projection.detach()
    assert not all(
        torch.equal(a, b) for a, b in zip(defended.parameters(), plain.parameters(), strict=True)
    )


def test_attached_to_a_plain_loop_the_concept_does_not_move() -> None:
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, cross_attention_dim=384)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2, weight_decay=0.1)
    basis = torch.linalg.qr(torch.randn(384, 3, dtype=torch.float64))[0]
    projection = TextProjection(basis=basis).attach(unet, optimizer)
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
    settings = tiny_settings(
        shapes_dir / "train",
        tmp_path / "two",
        train_batch_size=4,
        max_text_length=16,
        defense=("projection",),
        concept=CONCEPT,
    )
    done = train_on_two_processes(settings)
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = json.loads((tmp_path / "two" / "memguard.json").read_text())
    assert metadata["num_processes"] == 2
    assert defense_records(tmp_path / "two")["projection"]["report"]["leak"] <= 1e-5


def test_lora_adapters_are_projected(shapes_dir: Path, tmp_path: Path) -> None:
    pipeline = make_tiny_stable_diffusion(tmp_path / "sd")
    # the tiny random CLIP's 32-wide states: the concept's subspace is most of them
    projection = TextProjection(concept=CONCEPT, max_removed=1.0)
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


# ------------------------------------------------------------------------------ feature mode


def test_im2col_rows_reproduce_the_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, stride=2)
    x = torch.randn(2, 3, 8, 8)
    rows = layer_rows(conv, x)  # (2 * 16, 27)
    expected = (conv(x) - conv.bias[:, None, None]).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(rows @ conv.weight.flatten(1).T, expected, atol=1e-5, rtol=1e-5)


def test_gram_basis_spans_the_top_singular_directions() -> None:
    torch.manual_seed(0)
    rows = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([10, 5, 1, 0.1, 0.1, 0.1])
    basis = basis_from_gram(rows.T @ rows, energy=0.99)
    assert basis.shape[1] == energy_basis(rows, 0.99).shape[1] == 2
    reference = energy_basis(rows, 0.99)
    assert torch.allclose(basis @ basis.T, reference @ reference.T, atol=1e-8)


def test_directions_the_anchors_share_are_not_guarded() -> None:
    torch.manual_seed(0)
    mixing = torch.randn(2, 8, dtype=torch.float64)
    mixing[:, 7] = 0  # the shared directions leave coordinate 7 alone
    shared = torch.randn(100, 2, dtype=torch.float64) @ mixing
    own = torch.zeros(100, 8, dtype=torch.float64)
    own[:, 7] = torch.randn(100)
    concept = {"layer": (shared + own).T @ (shared + own)}
    anchor = {"layer": shared.T @ shared}
    basis = concept_feature_bases(concept, anchor, energy=0.99, anchor_energy=0.999)["layer"]
    assert basis.shape[1] == 1 and abs(abs(float(basis[7, 0])) - 1) < 1e-6
    inside = concept_feature_bases(anchor, anchor, energy=0.99, anchor_energy=0.999)["layer"]
    assert inside.shape[1] == 0


def feature_run(shapes_dir: Path, output: Path, **overrides):
    """(config, [projection]) of a tiny training run with feature-mode (or `projection_mode`)
    projection on the benchmark's exemplars."""
    settings = {
        "adam_weight_decay": 0.1,
        "defense": ("projection",),
        "concept": CONCEPT,
        "projection_mode": "feature",
        "concept_exemplars": str(shapes_dir / "concept_exemplars"),
    }
    return tiny_run(shapes_dir / "train", output, **(settings | overrides))


def test_feature_mode_certificate_on_convolutions(shapes_dir: Path, tmp_path: Path) -> None:
    config, (projection,) = feature_run(
        shapes_dir,
        tmp_path / "feature",
        projection_anchor_energy=0.0,  # no directions left free: every layer gets a subspace
        projection_max_removed=1.0,  # ... and most of the training signal
    )
    Trainer(config, [projection]).train()
    report = defense_records(tmp_path / "feature")["projection"]["report"]
    assert report["mode"] == "feature"
    assert report["leak"] <= 1e-5
    assert "conv_in.weight" in projection.weights and "conv_out.weight" in projection.weights
    assert not any(name.endswith(("attn2.to_k.weight", "time_emb_proj.weight"))
                   for name in projection.weights)  # fmt: skip
    assert report["subspace_rank"] > 0


def test_refreshed_subspaces_grow_and_keep_the_certificate(shapes_dir: Path, tmp_path: Path):
    config, (projection,) = feature_run(
        shapes_dir,
        tmp_path / "refresh",
        learning_rate=1e-2,
        projection_refresh_steps=2,
    )
    ranks = []
    original_measure = projection.measure

    def counting_measure(model, ctx) -> None:
        original_measure(model, ctx)
        ranks.append(sum(u.shape[1] for u in projection.layer_bases.values()))

    projection.measure = counting_measure
    Trainer(config, [projection]).train()
    assert len(ranks) == 3  # at the start, then twice during the 6 steps
    assert ranks[0] > 0 and ranks[-1] > ranks[0]
    assert projection.report()["leak"] <= 1e-5


def test_output_side_holds_what_each_layer_emits(shapes_dir: Path, tmp_path: Path) -> None:
    config, (projection,) = feature_run(
        shapes_dir,
        tmp_path / "output",
        projection_side="output",
        projection_anchor_energy=0.0,
        projection_max_removed=1.0,
    )
    Trainer(config, [projection]).train()
    assert projection.report()["side"] == "output"
    assert projection.report()["leak"] <= 1e-5
    for name in ("conv_in", "conv_out"):
        weight = projection.weights[f"{name}.weight"].param
        basis = projection.bases[f"{name}.weight"].float()
        held = projection.anchor[f"{name}.weight"].float()  # U^T W_0, transposed
        assert torch.allclose(basis.T @ weight.detach().flatten(1), held.T, atol=1e-5)
        assert f"{name}.bias" in projection.weights


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # the constant position
def test_footprint_is_where_welch_rejects_equal_means() -> None:
    """Every channel of each position where scipy's Welch test (Bonferroni over positions and
    channels) finds the exemplars' mean unlike the anchors': a pixel-exact mark and a shifted
    channel; not a position where both sets are the same constant."""
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(200, 2, 4, 4, generator=generator, dtype=torch.float64)
    exemplars = torch.randn(100, 2, 4, 4, generator=generator, dtype=torch.float64)
    exemplars[:, :, 3, 3] = 2.0  # a pixel-exact mark in a corner
    exemplars[:, 0, 0, 1] += 1.5  # one channel shifted
    exemplars[:, :, 2, 2] = anchors[:, :, 2, 2] = 0.5  # the same constant in both
    basis = concept_footprint(exemplars, anchors, alpha=1e-3)
    assert torch.equal(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype))
    welch = stats.ttest_ind(exemplars.flatten(2), anchors.flatten(2), equal_var=False)
    rejected = np.nan_to_num(welch.pvalue, nan=1.0) * 32 < 1e-3  # (channels, positions)
    assert set(np.flatnonzero(rejected.any(axis=0))) == {1, 15}
    guarded = basis.sum(1).view(2, 16)
    assert torch.equal(guarded, torch.from_numpy(rejected.any(axis=0)).double().expand(2, 16))


def test_footprint_refuses_to_guard_nothing() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(100, 2, 4, 4, generator=generator, dtype=torch.float64)
    with pytest.raises(ValueError, match="no position where the exemplars differ"):
        concept_footprint(images[:50], images[50:], alpha=1e-3)  # one distribution
    with pytest.raises(ValueError, match="at least 2 exemplars"):
        concept_footprint(images[:1], images[50:], alpha=1e-3)


def test_image_mode_projects_the_prediction_gradient() -> None:
    """The parameter gradients under image mode are those of the loss on the residual projected
    off the subspace: mean(((pred - target) (I - U U^T))^2)."""
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, cross_attention_dim=384)
    basis = torch.linalg.qr(torch.randn(3 * 8 * 8, 5, dtype=torch.float64))[0]
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    states, t = torch.randn(2, 4, 384), torch.tensor([10, 500])

    def gradients(projected_loss: bool) -> list[torch.Tensor]:
        unet.zero_grad()
        residual = unet(x, t, encoder_hidden_states=states).sample - target
        if projected_loss:
            flat = residual.flatten(1)
            residual = flat - (flat @ basis.float()) @ basis.float().T
        residual.square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    reference = gradients(projected_loss=True)
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.0)
    projection = ImageProjection(basis=basis).attach(unet, optimizer)
    defended = gradients(projected_loss=False)
    projection.detach()
    assert not unet._forward_hooks
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(defended, reference, strict=True))
    assert not all(torch.allclose(a, b) for a, b in zip(gradients(False), reference, strict=True))
    assert 0 < projection.report()["signal_removed"] < 1


def test_image_mode_trains_from_the_exemplars(shapes_dir: Path, tmp_path: Path) -> None:
    config, (projection,) = feature_run(shapes_dir, tmp_path / "image", projection_mode="image")
    Trainer(config, [projection]).train()
    report = defense_records(tmp_path / "image")["projection"]["report"]
    assert report["mode"] == "image" and "leak" not in report
    assert report["subspace_rank"] > 0
    assert 0 < report["signal_removed"] < 0.5
    assert 0 < report["signal_removed_first_step"] < 0.5
    assert not projection._handles  # the trainer detached it
    blank = Image.new("RGB", (8, 8))
    logo = torch.from_numpy(np.array(stamp_logo(blank)).any(axis=2))
    guarded = projection.basis.sum(1).view(3, 8, 8).bool()
    assert guarded.any() and not (guarded & ~logo).any()  # found from 6 exemplars: the logo's


# ------------------------------------------------------------------- settings and resume


MODE_SETTINGS = {
    "text": {},
    "feature": {  # no directions left free: every layer gets a subspace (and most of the signal)
        "projection_mode": "feature",
        "projection_anchor_energy": 0.0,
        "projection_max_removed": 1,
    },
    "image": {"projection_mode": "image"},
}


def mode_run(mode: str, shapes_dir: Path, output: Path, **overrides):
    settings = {"defense": ("projection",), "concept": CONCEPT, "max_text_length": 16}
    if mode != "text":
        settings["concept_exemplars"] = str(shapes_dir / "concept_exemplars")
    return tiny_run(shapes_dir / "train", output, **(settings | MODE_SETTINGS[mode] | overrides))


@pytest.mark.parametrize("mode", ["text", "feature", "image"])
def test_each_mode_resumes_to_the_same_weights_and_report(mode, shapes_dir: Path, tmp_path: Path):
    steps = {"checkpointing_steps": 3, "adam_weight_decay": 0.1}
    config, (full,) = mode_run(mode, shapes_dir, tmp_path / "full", **steps)
    Trainer(config, [full]).train()
    config, (first,) = mode_run(mode, shapes_dir, tmp_path / "split", **steps)
    Trainer(config, [first]).train()
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "checkpoint-6")
    (tmp_path / "split" / WEIGHTS).unlink()
    config, (resumed,) = mode_run(
        mode, shapes_dir, tmp_path / "split", resume_from_checkpoint="latest", **steps
    )
    assert Trainer(config, [resumed]).train().steps_run == 3
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    assert resumed.report() == full.report()


@pytest.mark.parametrize("mode", ["text", "feature", "image"])
def test_the_recorded_settings_rebuild_the_defense(mode, shapes_dir: Path, tmp_path: Path):
    config, (projection,) = mode_run(mode, shapes_dir, tmp_path / "run", max_train_steps=1)
    Trainer(config, [projection]).train()
    records = json.loads((tmp_path / "run" / "memguard.json").read_text())["defenses"]
    (rebuilt,) = rebuild(records, config)
    assert type(rebuilt) is type(projection) and rebuilt.config == projection.config
    assert records[0]["settings"].get("projection_mode", "text") == mode


def test_a_setting_of_another_mode_is_named(shapes_dir: Path, tmp_path: Path) -> None:
    other_mode = r"{}: a setting of projection_mode {}, not of projection_mode {}"
    with pytest.raises(
        ConfigError, match=other_mode.format("projection_refresh_steps", "feature", "image")
    ):
        mode_run("image", shapes_dir, tmp_path / "x", projection_refresh_steps=5)
    with pytest.raises(
        ConfigError, match=other_mode.format("projection_footprint_alpha", "image", "text")
    ):
        mode_run("text", shapes_dir, tmp_path / "x", projection_footprint_alpha=0.01)
    with pytest.raises(ConfigError, match=r"concept_exemplars: --projection_mode feature needs"):
        tiny_run(shapes_dir / "train", tmp_path / "x", defense=("projection",), concept=CONCEPT,
                 projection_mode="feature")  # fmt: skip
    with pytest.raises(ConfigError, match=r"concept: --defense projection needs at least one"):
        tiny_run(shapes_dir / "train", tmp_path / "x", defense=("projection",))


# ------------------------------------------------------------------ no silent destruction


def test_the_removed_signal_is_the_gradient_energy_in_the_subspace() -> None:
    torch.manual_seed(0)
    unet = build_unet("tiny", 8, cross_attention_dim=384)
    basis = torch.linalg.qr(torch.randn(384, 20, dtype=torch.float64))[0]
    projection = TextProjection(basis=basis)
    projection.setup(unet, None)
    states = torch.randn(2, 4, 384)
    unet(torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), encoder_hidden_states=states)[
        0
    ].square().mean().backward()
    grads = [g.param.grad.double().flatten(1) for g in projection.weights.values()]
    removed = sum(float((g @ basis).square().sum()) for g in grads)
    total = sum(float(g.square().sum()) for g in grads)
    projection.project_gradients()
    assert projection.report()["signal_removed"] == pytest.approx(removed / total, rel=1e-6)
    assert all(
        float((g.param.grad.double().flatten(1) @ basis).abs().max()) < 1e-6
        for g in projection.weights.values()
    )


def test_a_projection_that_removes_most_of_the_signal_stops_before_training(
    shapes_dir: Path, tmp_path: Path
) -> None:
    """A footprint of nine tenths of the image: the first step would remove most of what the
    data teaches. The run stops before any weight changes, naming the flag; the flag lets it
    through."""
    coordinates = torch.randperm(192, generator=torch.Generator().manual_seed(0))[:173]
    basis = torch.eye(192, dtype=torch.float64)[:, coordinates]
    config = tiny_config(shapes_dir / "train", tmp_path / "broken", checkpointing_steps=1)
    with pytest.raises(
        ConfigError, match=r"projection_max_removed: the projection removed 9\d\.\d% "
    ):
        Trainer(config, [ImageProjection(basis=basis)]).train()
    assert not (tmp_path / "broken" / "checkpoints").exists()
    assert not (tmp_path / "broken" / WEIGHTS).exists()
    config = tiny_config(shapes_dir / "train", tmp_path / "allowed", max_train_steps=2)
    allowed = ImageProjection(basis=basis, max_removed=1.0)
    Trainer(config, [allowed]).train()
    assert allowed.report()["signal_removed_first_step"] > 0.5


def test_the_run_log_and_memguard_json_carry_the_removed_signal(shapes_dir: Path, tmp_path):
    config, (projection,) = mode_run("text", shapes_dir, tmp_path / "run")
    Trainer(config, [projection]).train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(0 < line["projection/signal_removed"] < 0.75 for line in lines)
    report = defense_records(tmp_path / "run")["projection"]["report"]
    assert 0 < report["signal_removed_first_step"] < 0.75 and 0 < report["signal_removed"] < 0.75
    assert report["signal_removed_first_step"] != report["signal_removed"]  # one step vs six
