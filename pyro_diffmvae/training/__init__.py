"""Training: a Lightning module around Pyro's ELBO, and a plain SVI loop for notebooks.

One concept per module:

* :mod:`~pyro_diffmvae.training.module`: :class:`DiffMVAEModule` (Lightning) and :class:`NonFiniteLossError`;
* :mod:`~pyro_diffmvae.training.checkpointing`: :class:`AtomicCheckpointIO`, :class:`SaveOnInterrupt`,
  :func:`run_checkpoints` and :func:`make_trainer`;
* :mod:`~pyro_diffmvae.training.data`: :class:`ResumableDataLoader` over :class:`EpochPermutationSampler`,
  and :func:`batch_size_of`;
* :mod:`~pyro_diffmvae.training.rng`: :func:`rng_states`, :func:`set_rng_states` and
  :func:`rank_and_world_size`;
* :mod:`~pyro_diffmvae.training.accelerator`: channels-last and ``torch.compile`` of the diffusion
  decoders' ε-networks (the GPU path);
* :mod:`~pyro_diffmvae.training.svi`: :func:`fit_svi`;
* :mod:`~pyro_diffmvae.training.warmup`: :class:`Warmup`, the schedule of the warm-up callbacks
  :class:`~pyro_diffmvae.training.kl_warmup.KLWarmup` and
  :class:`~pyro_diffmvae.training.diffusion_warmup.DiffusionWarmup`.

Robust runs are on by default through :func:`make_trainer` and :class:`ResumableDataLoader`: a
non-finite loss stops the run (or its batch is skipped) naming the step and the ELBO terms,
checkpoints are written atomically, ``trainer.fit(..., ckpt_path=...)`` resumes exactly (weights,
optimizer, EMA, loop counters, RNG states and the position in the data), SIGTERM / Ctrl-C save a
resumable checkpoint, and under DDP every rank seeds with ``seed + global_rank`` and reads its own
share of the data.
"""

from .accelerator import (batch_to_channels_last, compile_eps_nets, diffusion_eps_nets, eps_nets_to_channels_last,
                          uncompile_eps_nets)
from .checkpointing import AtomicCheckpointIO, SaveOnInterrupt, make_trainer, run_checkpoints
from .data import EpochPermutationSampler, ResumableDataLoader, batch_size_of
from .module import DiffMVAEModule, NonFiniteLossError
from .rng import rank_and_world_size, rng_states, set_rng_states
from .svi import fit_svi

__all__ = ["DiffMVAEModule", "make_trainer", "run_checkpoints", "fit_svi", "NonFiniteLossError", "AtomicCheckpointIO",
           "SaveOnInterrupt", "ResumableDataLoader", "EpochPermutationSampler", "diffusion_eps_nets",
           "eps_nets_to_channels_last", "batch_to_channels_last", "compile_eps_nets", "uncompile_eps_nets",
           "batch_size_of", "rng_states", "set_rng_states", "rank_and_world_size"]
