"""The core of gradient projection on weights: a guard that keeps chosen weights from moving on
a concept's subspace (Kothandaraman & Pytlarz, "Beyond Memorization: Gradient Projection
Enables Selective Learning in Diffusion Models", arXiv 2512.11194).

A weight W acting on inputs x learns only through outer products g x^T, so right-multiplying its
gradient by P = I - U U^T, with U an orthonormal basis of the concept's inputs to that weight,
removes every training signal those inputs carry. Adam's per-coordinate scaling and decoupled
weight decay still move W along span(U), so after every optimizer step W is restored on the
subspace: W <- W + (W_0 U - W U) U^T, which keeps W c = W_0 c exactly for every c in span(U).
The certificate is the leak max_{c in span(U)} ||(W_T - W_0) c|| / ||W_0 c|| over the guarded
weights (a generalised eigenvalue problem in r dimensions).

`SubspaceGuard` holds the weights and their bases, projects gradients and updates, computes the
certificate and carries its state through checkpoints; text mode and feature mode choose what to
guard (`projection_text`, `projection_feature`). `rank_for_energy` is the one rule by which every
mode sizes a subspace from an energy fraction (Saha et al.'s GPM criterion).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from memguard.defenses.base import Defense, TrainingContext
from memguard.defenses.signal import RemovedSignal


def rank_for_energy(energies: torch.Tensor, needed: float) -> int:
    """How many leading entries of `energies` (descending, >= 0) it takes to hold `needed`
    (an amount, not a fraction): the fewest whose sum reaches it (0 when nothing is needed)."""
    if needed <= 0:
        return 0
    return min(int((torch.cumsum(energies, 0) < needed).sum()) + 1, len(energies))


def energy_basis(vectors: torch.Tensor, energy: float) -> torch.Tensor:
    """(d, r) orthonormal: the top right-singular vectors of the rows of `vectors` holding
    `energy` of sum(S^2)."""
    _, singular, vh = torch.linalg.svd(vectors.double(), full_matrices=False)
    squared = singular**2
    return vh[: rank_for_energy(squared, energy * float(squared.sum()))].T.contiguous()


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) as the matrix whose rows meet its inputs: (out, fan_in)."""
    return tensor.view(len(tensor), -1)


def columns_of(tensor: torch.Tensor) -> torch.Tensor:
    """A weight (or its gradient) as the matrix whose rows meet the layer's outputs: (fan_in, out),
    a view; a bias becomes one row."""
    return tensor.view(len(tensor), -1).T


@dataclass
class Guarded:
    """A weight to project, and the weight it changes as it acts (itself, or W + s B A).

    `matrix` views the parameter (or its gradient) as the matrix M that the subspace basis U
    multiplies from the right: M <- M (I - U U^T) projects, M U = M_0 U is the invariant."""

    param: nn.Parameter  # receives the projected gradients and updates
    matrix: Callable[[torch.Tensor], torch.Tensor] = rows_of
    lora_weight: Callable[[], torch.Tensor] | None = None  # base + s B A, when param is A

    def acting(self) -> torch.Tensor:
        """M of the weight as it acts on the layer's input (base + LoRA delta under LoRA)."""
        return self.lora_weight() if self.lora_weight is not None else self.matrix(self.param)

    @torch.no_grad()
    def held(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M U, M_acting U) in float64: what the invariant and the certificate hold fixed."""
        u = u.to(self.param.device, torch.float64)
        return self.matrix(self.param).double() @ u, self.acting().double() @ u


class SubspaceGuard(Defense):
    """Projects the gradients and updates of guarded weights off their subspaces.

    Subclasses choose the weights and bases in `guarded(model, ctx)`; the guard holds each
    weight at its value on its subspace, from `setup` on (or from when a direction is added
    with `extend`)."""

    name = "projection"
    needs_text = True  # its subspaces are measured under captions naming the concept
    signal_source = "the guarded weights' gradient energy"

    def __init__(self, max_removed: float = 0.75) -> None:
        self.signal = RemovedSignal(max_removed)
        self.weights: dict[str, Guarded] = {}
        self.bases: dict[str, torch.Tensor] = {}  # per guarded parameter, (width, r)
        self.anchor: dict[str, torch.Tensor] = {}  # P_0 U per projected parameter P
        self.effective_anchor: dict[str, torch.Tensor] = {}  # W_0 U per guarded weight
        self._u: dict[str, torch.Tensor] = {}
        self._u64: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def guarded(
        self, model: nn.Module, ctx: TrainingContext | None
    ) -> tuple[dict[str, Guarded], dict[str, torch.Tensor]]:
        """(weights, bases) to guard, by parameter name."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- hooks

    def setup(self, model: nn.Module, optimizer, ctx: TrainingContext | None = None) -> None:
        self.weights, self.bases = self.guarded(model, ctx)
        for name, guarded in self.weights.items():
            weight, basis = guarded.param, self.bases[name]
            width = guarded.matrix(weight).shape[1]
            if width != basis.shape[0]:
                raise ValueError(
                    f"{name}: width {width} != subspace width {basis.shape[0]} "
                    "(was the subspace built with this model and text encoder?)"
                )
            with torch.no_grad():
                u = basis.to(weight.device)
                if ".lora_A." in name:  # LoRA: start A inside the complement
                    weight -= ((weight.double() @ u) @ u.T).to(weight.dtype)
                self.anchor[name], self.effective_anchor[name] = guarded.held(basis)
        self._place_bases()

    def after_backward(self, model: nn.Module, ctx: TrainingContext) -> None:
        self.project_gradients()
        self.signal.end_step(ctx.group, self.signal_source)

    def log_values(self) -> dict:
        return {"signal_removed": self.signal.take_window()}

    def after_step(self, model: nn.Module, ctx: TrainingContext) -> None:
        self.restore_subspace()

    # ---------------------------------------------------------------------- projection

    def _place_bases(self) -> None:
        """Each basis on its weight's device, in float64 (restoring) and the weight's dtype
        (projecting gradients), made once rather than at every step."""
        self._u64, self._u = {}, {}
        for name, guarded in self.weights.items():
            self._u64[name] = self.bases[name].to(guarded.param.device, torch.float64)
            self._u[name] = self._u64[name].to(guarded.param.dtype)

    @torch.no_grad()
    def project_gradients(self) -> None:
        """grad <- grad (I - U U^T) for every guarded weight; the energy removed (||G U||^2,
        U orthonormal) and the total are counted."""
        removed = total = torch.zeros((), dtype=torch.float64)
        for name, guarded in self.weights.items():
            grad = guarded.param.grad
            if grad is not None:
                u = self._u[name]
                flat = guarded.matrix(grad)
                coefficients = flat @ u
                removed = removed + coefficients.double().square().sum().cpu()
                total = total + flat.double().square().sum().cpu()
                flat -= coefficients @ u.T
        if self.weights:
            self.signal.add(removed, total)

    @torch.no_grad()
    def restore_subspace(self) -> None:
        """W <- W + (W_0 U - W U) U^T: the weights do not move on the concept's subspace."""
        for name, guarded in self.weights.items():
            weight = guarded.matrix(guarded.param)
            u = self._u64[name]
            drift = self.anchor[name] - weight.double() @ u
            weight += (drift @ u.T).to(weight.dtype)

    @torch.no_grad()
    def extend(self, name: str, fresh: torch.Tensor) -> None:
        """Add orthonormal directions `fresh` (orthogonal to the current basis) to a guarded
        parameter's subspace, held at the value the weight has on them now."""
        held, acting = self.weights[name].held(fresh)
        self.anchor[name] = torch.cat([self.anchor[name], held], dim=1)
        self.effective_anchor[name] = torch.cat([self.effective_anchor[name], acting], dim=1)
        self.bases[name] = torch.cat([self.bases[name], fresh], dim=1)
        self._place_bases()

    # ------------------------------------------------------------- attach to your own loop

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SubspaceGuard:
        """Set up and register torch hooks: gradients are projected as they are accumulated,
        and the subspace is restored after every `optimizer.step()`. Attaching twice is an error.
        """
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already attached; detach() it first")
        self.setup(model, optimizer)
        for guarded in self.weights.values():
            self._handles.append(
                guarded.param.register_post_accumulate_grad_hook(lambda _: self.project_gradients())
            )
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore_subspace()))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --------------------------------------------------------------------- certificate

    @torch.no_grad()
    def leak(self) -> float:
        """max over guarded weights and c in their subspace of ||(W - W_0) c|| / ||W_0 c||, with W
        the weight as it multiplies its input (base + LoRA delta under LoRA) and W_0 the weight
        when c joined the subspace. Directions c that W_0 maps to (nearly) zero, as a layer with
        fewer outputs than subspace directions has, are measured against W_0's largest response
        on the subspace instead."""
        worst = 0.0
        for name, guarded in self.weights.items():
            u = self.bases[name]
            if u.shape[1] == 0:
                continue
            b = self.effective_anchor[name]  # W_0 U
            acting = guarded.acting().double()
            a = acting @ u.to(acting.device) - b  # (W - W_0) U
            _, singular, vh = torch.linalg.svd(b, full_matrices=True)
            responds = int((singular > 1e-6 * singular[0]).sum())
            on_range = a @ vh[:responds].T / singular[:responds]  # c = V S^-1 z, ||W_0 c|| = ||z||
            worst = max(worst, float(torch.linalg.matrix_norm(on_range, ord=2)))
            if responds < u.shape[1]:
                null = a @ vh[responds:].T / singular[0]
                worst = max(worst, float(torch.linalg.matrix_norm(null, ord=2)))
        return worst

    def state_dict(self) -> dict:
        return {
            "bases": dict(self.bases),
            "anchor": dict(self.anchor),
            "effective_anchor": dict(self.effective_anchor),
            "signal": self.signal.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.bases = dict(state["bases"])
        self.anchor = dict(state["anchor"])
        self.effective_anchor = dict(state["effective_anchor"])
        self.signal.load_state_dict(state["signal"])
        self._place_bases()

    def report(self) -> dict:
        return {
            "guarded_weights": len(self.weights),
            "leak": self.leak() if self.weights else None,
            **self.signal.report(),
        }
