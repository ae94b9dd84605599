"""MoPoE as published keeps its experts on: the prior expert only in the product of all modalities.

With N(0, I) multiplied into every subset's product, an expert can switch itself off (its
log-variance → +∞ gives q(z | x_m) = p(z) for its singleton subset and a zero KL); the MoPoE
authors' code multiplies the prior into the full product only. This trains MoPoE with
*unclamped* log-variances (as the authors' PolyMNIST encoders) on a small PolyMNIST built from the
real MNIST digits and background photos, and checks that the latent stays in use.

Bug this catches: a fusion that puts the prior expert in every product (or any other way for the
experts to collapse onto the prior): the KL goes to zero and the posterior means stop varying
across examples.
"""

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pyro_diffmvae.data.polymnist import POLYMNIST_MODALITIES, PolyMNISTDataset, build_polymnist
from pyro_diffmvae.modality import FeedForwardDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE
from pyro_diffmvae.nets.decoders import ConvDecoder
from pyro_diffmvae.nets.encoders import ConvEncoder
from pyro_diffmvae.objectives import ELBO
from pyro_diffmvae.train import fit_svi

SHARED_DATA = Path(os.environ.get("PYRO_DIFFMVAE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
needs_real_data = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir() or not (SHARED_DATA / "polymnist_backgrounds").is_dir(),
    reason=f"real data not found at {SHARED_DATA} (set PYRO_DIFFMVAE_DATA to the shared data folder)",
)
LATENT, STEPS, BATCH = 16, 300, 32


def polymnist_mopoe(prior_expert: str) -> MultimodalVAE:
    """MoPoE's PolyMNIST setting at a small size: unclamped conv experts, Laplace decoders, β = 2.5."""
    torch.manual_seed(0)
    mods = [Modality(m, ConvEncoder(3, 28, LATENT, width=16, logvar_bound=None),
                     FeedForwardDecoder(ConvDecoder(LATENT, 3, 28, width=16), (3, 28, 28), "laplace", scale=0.75))
            for m in POLYMNIST_MODALITIES]
    return MultimodalVAE(mods, LATENT, fusion="mopoe", prior_expert=prior_expert, beta=2.5)


@pytest.fixture(scope="module")
def polymnist_batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("polymnist")
    build_polymnist(SHARED_DATA, SHARED_DATA / "polymnist_backgrounds", root / "data", num_train=512, num_test=64)
    train = PolyMNISTDataset(root / "data", "train", cache_dir=root / "cache")
    test = PolyMNISTDataset(root / "data", "test", cache_dir=root / "cache")
    strip = lambda b: {m: b[m] for m in POLYMNIST_MODALITIES}  # noqa: E731  (labels are not modalities)
    batches = [strip(b) for b in DataLoader(train, batch_size=BATCH, shuffle=True, drop_last=True,
                                            generator=torch.Generator().manual_seed(0))]
    return batches, strip(next(iter(DataLoader(test, batch_size=64))))


def train_and_measure(placement, polymnist_batches):
    batches, held_out = polymnist_batches
    vae = polymnist_mopoe(placement)
    assert vae.prior_expert == placement
    fit_svi(vae, batches, STEPS, lr=1e-3)
    with torch.no_grad():
        kl = ELBO().terms(vae, held_out)["kl"].item()
        # each singleton subset's conditional is that expert (times the prior for "every"): how much
        # its mean varies across the held-out examples says whether the expert is in use
        spread = {m: vae.posterior(held_out, given=[m]).mean.std(0).mean().item() for m in POLYMNIST_MODALITIES}
        _, logvar = vae.experts(held_out, torch.ones(64, 5, dtype=torch.bool))
    return kl, spread, logvar.max().item()


@pytest.mark.data
@needs_real_data
def test_mopoe_with_unclamped_experts_keeps_a_positive_kl_and_a_varying_latent(polymnist_batches):
    """MoPoE as published (the default): measured 300 steps: KL ≈ 20, spreads 0.5–0.9, max log-variance ≈ 2."""
    kl, spread, logvar_max = train_and_measure("full", polymnist_batches)
    assert kl > 5.0, kl
    assert min(spread.values()) > 0.3, spread
    assert logvar_max < 5.0  # no expert has switched itself off


@pytest.mark.slow  # 75 s on 2 cores; the default suite keeps the test above, the published placement
@pytest.mark.data
@needs_real_data
def test_the_prior_expert_in_every_product_lets_the_experts_collapse(polymnist_batches):
    """The same run with the prior in every product (MVAE's placement; this library's MoPoE before):
    measured: every expert's mean spread ≈ 0.04 after 50 steps, and no recovery by step 300 — the
    failure the test above guards against. (At 100 steps the published placement's spreads are also
    ≈ 0.08 and its KL ≈ 3: it recovers later, so neither test may be shortened.)"""
    _, spread, _ = train_and_measure("every", polymnist_batches)
    assert max(spread.values()) < 0.15, spread
