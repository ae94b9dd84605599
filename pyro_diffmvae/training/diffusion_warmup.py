r"""Diffusion warm-up (issue 14, a lever for a latent that the diffusion decoders can read): for the first K
optimizer steps the program leaves the diffusion decoders' likelihood sites out, so that the encoders, the
feed-forward decoders and the hint decoders (``model.unet.hint``, trained by ``model.objective=elbo_hint``) learn
z first, at the speed of a feed-forward model, before the diffusion decoders start:

.. math:: -\mathcal L^{\text{warm-up}}_\gamma = -\sum_b\sum_{A\in S}\omega_{A,b}\Big\{
          \sum_{m\,\notin\,\text{diffusion}} \lambda_m\,\mathbb E_{q(z\mid x_{A,b})}\log p_\theta(x^m_b\mid z)
          + \gamma\sum_{m\,\in\,\text{hinted}}\mathbb E_{q(z\mid x_{A,b})}\log p_{\phi_m}(x^m_b\mid z)
          - \beta\,\mathrm{KL}\big(q(z\mid x_{A,b})\,\Vert\,p(z)\big)\Big\}

(the subset ELBO of paper eq. 3–5 with the diffusion terms, the score-matching bounds of its eq. 2, dropped;
with the hint term of :mod:`pyro_diffmvae.objectives.hint_elbo`). With hints this is MoPoE with the hint
decoders as decoders; without them (and without feed-forward modalities) nothing but the KL is left, and z
collapses: the callback refuses a model with no other term. The diffusion decoders' networks are not run during
warm-up (their site is not in the trace), so a warm-up step costs what a feed-forward step costs. From step K on
the objective is the configured one again. Validation always scores the full objective, so ``best.ckpt``
compares like with like. ``trainer.diffusion_warmup_steps`` (0: off). Not in the paper; the objective is not
the ELBO during warm-up.
Under DDP the diffusion networks get no gradient during warm-up, which plain DDP refuses: use
``trainer.strategy=ddp_find_unused_parameters_true``.

A Lightning callback with the schedule of :mod:`.warmup` (as :mod:`.kl_warmup`): which sites the program scores
is a property of the Pyro program (``MultimodalVAE.unscored``), which the callback sets and restores when
training ends or fails.
"""

from __future__ import annotations

from .warmup import Warmup

__all__ = ["DiffusionWarmup", "diffusion_modalities"]


def diffusion_modalities(vae) -> frozenset[str]:
    """The names of the modalities decoded by a diffusion decoder."""
    return frozenset(name for name, mod in vae.modalities.items() if mod.is_diffusion)


class DiffusionWarmup(Warmup):
    """Leave the diffusion decoders' likelihood sites out of the program while ``global_step < steps``."""

    name = "diffusion warm-up"

    def start(self, pl_module) -> None:
        vae = pl_module.vae
        left_out = diffusion_modalities(vae)
        if not left_out:
            raise ValueError("trainer.diffusion_warmup_steps > 0 needs a model with diffusion decoders; this one has "
                             "none (set it to 0)")
        hinted = {name for name in left_out if getattr(vae.modalities[name].decoder, "hint", None) is not None}
        if len(left_out) == len(vae.modalities) and not (hinted and getattr(pl_module.objective, "hint_weight", 0) > 0):
            raise ValueError("trainer.diffusion_warmup_steps > 0: every modality has a diffusion decoder and no hint term "
                             "is trained (model.unet.hint=true with model.objective=elbo_hint, hint_weight > 0), so "
                             "the warm-up objective would be the KL alone and z would collapse")
        self._left_out = left_out

    def apply(self, pl_module, step: int | None) -> None:
        pl_module.vae.unscored = self._left_out if step is not None and step < self.steps else frozenset()
