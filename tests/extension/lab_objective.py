r"""A user's training objective, defined outside the package (docs/extending.md, "An objective").

The subset ELBO with the KL estimated from the draw instead of in closed form: Pyro's
``Trace_ELBO`` scores :math:`\log p(z) - \log q(z\mid x_A)` at the sampled z, whose expectation under
q is :math:`-\mathrm{KL}(q\,\Vert\,p)`, so the loss has the same expectation as the package's
:class:`~pyro_diffmvae.objectives.ELBO` (``TraceMeanField_ELBO``, analytic KL) with more variance.
It logs the Monte-Carlo loss as the extra term ``"loss_mc_kl"`` and validates on it.
"""

from pyro.infer import Trace_ELBO

from pyro_diffmvae.objectives import ELBO


class MonteCarloKLELBO(ELBO):
    name = "elbo_mc_kl"

    def __init__(self, num_particles: int = 1):
        super().__init__(num_particles)
        self.elbo = Trace_ELBO(num_particles=self.num_particles, max_plate_nesting=2)

    def terms(self, vae, batch):
        terms = super().terms(vae, batch)  # the parts of one draw, with the analytic KL for logging
        terms["loss"] = terms["loss_mc_kl"] = self.loss(vae, batch) / vae.parse_batch(batch)[2]
        return terms
