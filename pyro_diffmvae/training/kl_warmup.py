r"""KL warm-up (issue 14, a lever against posterior collapse): the KL weight grows linearly over the first K
optimizer steps (Bowman et al. 2016; Sønderby et al. 2016),

.. math:: \beta_k = \beta\,\min\!\Big(1, \frac{k + 1}{K}\Big), \qquad k = 0, 1, \dots

so that the encoders put information into z before the KL term can price it out — which a decoder that
models its modality without z (a diffusion decoder above all) otherwise makes the cheaper optimum. During
warm-up the objective is not the ELBO; from step K - 1 on it is again. Validation always scores the full-β
objective, so ``best.ckpt`` compares like with like. ``trainer.kl_warmup_steps`` (0: off).

A Lightning callback rather than an optimiser-side schedule: β is a property of the Pyro program
(``poutine.scale`` of the latent site) and of objectives that carry their own β, which the callback scales
together and restores when training ends or fails.
"""

from __future__ import annotations

from .warmup import Warmup

__all__ = ["KLWarmup"]


class KLWarmup(Warmup):
    """Scale ``vae.beta`` (and the objective's own ``beta``, when it has one) by ``min(1, (step + 1) / steps)``."""

    name = "KL warm-up"

    def factor(self, step: int) -> float:
        """min(1, (step + 1) / steps) at optimizer step ``step`` (0-based)."""
        return min(1.0, (step + 1) / self.steps)

    def start(self, pl_module) -> None:
        self._full = (pl_module.vae.beta, getattr(pl_module.objective, "beta", None))  # as configured

    def apply(self, pl_module, step: int | None) -> None:
        factor = 1.0 if step is None else self.factor(step)
        vae_beta, objective_beta = self._full
        pl_module.vae.beta = vae_beta * factor
        if objective_beta is not None:
            pl_module.objective.beta = objective_beta * factor
