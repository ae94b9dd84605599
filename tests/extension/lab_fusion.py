r"""A user's product rule for the fusion, defined outside the package (docs/extending.md, "A fusion").

The tempered product of experts: every expert (and the prior expert, where the fusion places it)
raised to the power :math:`1/\tau`,

.. math:: q_\tau(z) \propto \prod_m \mathcal N(z; \mu_m, \sigma_m^2)^{1/\tau}
          = \mathcal N\big(z;\ \mu_{\mathrm{PoE}},\ \tau\,\sigma^2_{\mathrm{PoE}}\big),

since scaling every precision by :math:`1/\tau` leaves the precision-weighted mean unchanged and
scales the joint precision by :math:`1/\tau`. τ = 1 is the PoE; τ > 1 widens the fused posterior.
"""

import math

from pyro_diffmvae.fusion import poe


def tempered_poe(mu, logvar, mask=None, prior_expert=True, temperature: float = 2.0):
    if not temperature > 0:
        raise ValueError(f"tempered_poe: the temperature must be positive, got {temperature}")
    mu_poe, logvar_poe = poe(mu, logvar, mask, prior_expert)
    return mu_poe, logvar_poe + math.log(temperature)
