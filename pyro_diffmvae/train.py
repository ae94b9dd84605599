"""Training (kept for existing imports): the code lives in :mod:`pyro_diffmvae.training`, one concept per module.

``from pyro_diffmvae.train import DiffMVAEModule, fit_svi, make_trainer, ...`` keeps working: this
module re-exports every public name of :mod:`pyro_diffmvae.training`.
"""

from .training import *  # noqa: F401,F403  (the names of training.__all__)
from .training import __all__  # noqa: F401
