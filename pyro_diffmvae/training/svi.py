"""A plain ``pyro.infer.SVI`` training loop, for notebooks (no Lightning), on any objective."""

from __future__ import annotations

from typing import Iterable, Mapping

import pyro
from pyro.infer import SVI

from ..model import MultimodalVAE
from ..objectives import Objective, bind_objective
from .data import batch_size_of

__all__ = ["fit_svi"]


def fit_svi(
    vae: MultimodalVAE,
    batches: Iterable[Mapping],
    steps: int,
    lr: float = 1e-3,
    clip_norm: float | None = 10.0,
    num_particles: int = 1,
    callback=None,
    objective: Objective | None = None,
) -> list[float]:
    """Train with a plain ``pyro.infer.SVI`` loop (``ClippedAdam``); returns the loss per example per
    step (for the subset ELBO, −ELBO).

    ``objective``: an :class:`~pyro_diffmvae.objectives.Objective` or a callable ``(vae, batch) -> loss``
    (default: ``ELBO(num_particles)``); SVI steps on its ``loss`` (the parameters are registered with
    Pyro's param store first, so objectives that never run the guide train too). The model's
    ``conditional`` is set to the objective's. ``batches`` is cycled until ``steps`` steps are done.
    """
    objective = bind_objective(vae, objective, num_particles)
    optim_args = {"lr": lr}
    if clip_norm is not None:
        optim_args["clip_norm"] = clip_norm

    def loss(model, guide, batch):  # SVI's callable-loss form: loss(model, guide, *args)
        pyro.module(vae.pyro_name, vae)
        return objective.loss(vae, batch)

    svi = SVI(vae.model, vae.guide, pyro.optim.ClippedAdam(optim_args), loss)
    losses: list[float] = []
    while len(losses) < steps:
        progressed = False
        for batch in batches:
            progressed = True
            losses.append(svi.step(batch) / batch_size_of(vae, batch))
            if callback is not None:
                callback(len(losses), losses[-1])
            if len(losses) >= steps:
                break
        if not progressed:
            raise ValueError("fit_svi: no batches")
    return losses
