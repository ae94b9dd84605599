"""Training (kept for existing imports): the code lives in :mod:`pyro_diffmvae.training`, one concept per module.

``from pyro_diffmvae.train import DiffMVAEModule, fit_svi, make_trainer, ...`` keeps working: this
module re-exports every public name of :mod:`pyro_diffmvae.training`, and ``Objective`` (the type
the module and ``fit_svi`` take, now :class:`pyro_diffmvae.objectives.Objective`).
"""

from .objectives import Objective  # noqa: F401
from .training import *  # noqa: F401,F403  (the names of training.__all__)
from .training import __all__ as _training_names

__all__ = [*_training_names, "Objective"]
