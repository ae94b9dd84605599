import numpy as np
import pytest
import torch

from pyro_diffmvae.fusion import moe_sample, poe, subset_family, subset_weights


def numpy_poe(mu, var, prior=True):
    """Precision-weighted product of diagonal Gaussians, the textbook way."""
    prec = 1.0 / var
    if prior:
        prec = np.concatenate([prec, np.ones_like(prec[:1])], 0)
        mu = np.concatenate([mu, np.zeros_like(mu[:1])], 0)
    var_joint = 1.0 / prec.sum(0)
    return var_joint * (prec * mu).sum(0), var_joint


@pytest.mark.parametrize("prior", [True, False])
def test_poe_matches_numpy(prior):
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, 5))
    var = rng.uniform(0.1, 3.0, size=(3, 5))
    m, lv = poe(torch.tensor(mu), torch.tensor(np.log(var)), prior_expert=prior)
    m_np, v_np = numpy_poe(mu, var, prior)
    np.testing.assert_allclose(m.numpy(), m_np, rtol=1e-12)
    np.testing.assert_allclose(np.exp(lv.numpy()), v_np, rtol=1e-12)


def test_poe_single_expert_without_prior_is_identity():
    mu, lv = torch.randn(4, 1, 3), torch.randn(4, 1, 3)
    m, v = poe(mu, lv, prior_expert=False)
    torch.testing.assert_close(m, mu[:, 0])
    torch.testing.assert_close(v, lv[:, 0])


def test_poe_stable_at_extreme_logvars():
    mu = torch.tensor([[1.0, 2.0], [-3.0, 5.0]])  # (M=2, D=2)
    logvar = torch.tensor([[-50.0, 50.0], [50.0, -50.0]], requires_grad=True)
    m, lv = poe(mu, logvar, prior_expert=True)
    assert torch.isfinite(m).all() and torch.isfinite(lv).all()
    # the very precise expert dominates each dim
    torch.testing.assert_close(m, torch.tensor([1.0, 5.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(lv, torch.tensor([-50.0, -50.0]), atol=1e-6, rtol=0)
    (m.sum() + lv.sum()).backward()
    assert torch.isfinite(logvar.grad).all()


def test_masked_experts_do_not_leak_nan():
    mu = torch.tensor([[1.0, 1.0], [float("nan"), float("nan")], [2.0, 0.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, 0.0], [float("nan"), float("inf")], [1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([True, False, True])
    m, lv = poe(mu, logvar, mask, prior_expert=True)
    m_ref, lv_ref = poe(mu[[0, 2]].detach(), logvar[[0, 2]].detach(), prior_expert=True)
    torch.testing.assert_close(m, m_ref)
    torch.testing.assert_close(lv, lv_ref)
    (m.sum() + lv.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
    assert (mu.grad[1] == 0).all() and (logvar.grad[1] == 0).all()


def test_all_masked_gives_prior_or_error():
    mu, lv = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    m, v = poe(mu, lv, mask, prior_expert=True)
    torch.testing.assert_close(m, torch.zeros(2, 4))
    torch.testing.assert_close(v, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no expert"):
        poe(mu, lv, mask, prior_expert=False)
    with pytest.raises(ValueError, match="mu has shape"):
        poe(mu, lv[..., :2])


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_poe_and_moe_sample_fuse_low_precision_experts_in_float32(low):
    """bf16/fp16 experts (encoder outputs under autocast) are upcast before the arithmetic: the result
    is float32 and equals the fusion of the same values given as float32, bit for bit."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, 5, generator=g).to(low)
    logvar = (3 * torch.randn(4, 3, 5, generator=g)).to(low)
    mask = torch.tensor([[True, False, True], [True, True, True], [False, True, False], [False, False, False]])
    m, lv = poe(mu, logvar, mask)
    assert m.dtype == lv.dtype == torch.float32
    m32, lv32 = poe(mu.float(), logvar.float(), mask)
    assert torch.equal(m, m32) and torch.equal(lv, lv32)
    # the float32 fusion is the float64 one to float32 round-off
    m64, lv64 = poe(mu.double(), logvar.double(), mask)
    assert m64.dtype == lv64.dtype == torch.float64  # float64 stays float64
    torch.testing.assert_close(m, m64.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lv, lv64.float(), rtol=1e-6, atol=1e-6)
    mu_k, logvar_k, k = moe_sample(mu[:3], logvar[:3], mask[:3], generator=torch.Generator().manual_seed(1))
    assert mu_k.dtype == logvar_k.dtype == torch.float32
    assert torch.equal(mu_k, mu.float()[torch.arange(3), k]) and torch.equal(logvar_k, logvar.float()[torch.arange(3), k])


def test_subset_families():
    names = ["a", "b", "c"]
    all_ = subset_family(names, "all")
    assert all_.shape == (7, 3) and all_.sum(1).tolist() == [1, 1, 1, 2, 2, 2, 3]
    assert len({tuple(r) for r in all_.tolist()}) == 7
    assert subset_family(names, "mvae").tolist() == [[True] * 3, [True, False, False], [False, True, False], [False, False, True]]
    assert subset_family(names, "singletons").sum(1).tolist() == [1, 1, 1]
    assert subset_family(names, "full").tolist() == [[True] * 3]
    assert subset_family(names, [["c", "a"], ["b"]]).tolist() == [[True, False, True], [False, True, False]]
    with pytest.raises(ValueError, match=r"unknown modalities \['d'\]"):
        subset_family(names, [["a", "d"]])
    with pytest.raises(ValueError, match="unknown subset family 'pairs'"):
        subset_family(names, "pairs")


def test_subset_weights_renormalise_over_available():
    fam = subset_family(["a", "b", "c"], "all")
    available = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    w = subset_weights(fam, available)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    torch.testing.assert_close(w[0], torch.full((7,), 1 / 7))
    # only {a} is valid for the second example
    assert w[1].tolist() == [1.0, 0, 0, 0, 0, 0, 0]
    # {a}, {b}, {a,b} for the third
    valid = [(fam[k] & ~available[2]).any().item() is False for k in range(7)]
    torch.testing.assert_close(w[2], torch.tensor(valid, dtype=torch.float32) / 3)
    base = torch.arange(1.0, 8.0)
    wb = subset_weights(fam, available, base)
    torch.testing.assert_close(wb[0], base / base.sum())
    with pytest.raises(ValueError, match=r"examples \[0\] have no valid subset"):
        subset_weights(fam, torch.tensor([[False, False, False]]))


# ------------------------------------------------------------------- fusions and the prior expert
from pyro_diffmvae.fusion import FUSIONS, Fusion, make_fusion, mixture_of_experts, prior_expert_flags  # noqa: E402


def test_poe_takes_one_prior_expert_flag_per_product():
    """A bool tensor of flags equals one call per product with that bool (bug: flags ignored or
    broadcast along the wrong dims)."""
    g = torch.Generator().manual_seed(0)
    mu, lv = torch.randn(4, 3, 2, 5, generator=g), torch.randn(4, 3, 2, 5, generator=g)  # (K, B, M, D)
    mask = torch.rand(4, 3, 2, generator=g) > 0.3
    mask[..., 0] = True
    flags = torch.rand(4, 3, generator=g) > 0.5
    m, v = poe(mu, lv, mask, flags)
    for k in range(4):
        for b in range(3):
            mk, vk = poe(mu[k, b], lv[k, b], mask[k, b], bool(flags[k, b]))
            torch.testing.assert_close(m[k, b], mk)
            torch.testing.assert_close(v[k, b], vk)


def test_prior_expert_placements():
    masks = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    assert prior_expert_flags(masks, "none") is False and prior_expert_flags(masks, "every") is True
    assert prior_expert_flags(masks, "full").tolist() == [False, False, True]  # MoPoE: the full product only
    with pytest.raises(ValueError, match="unknown prior expert placement"):
        prior_expert_flags(masks, "some")


def test_mopoe_singleton_is_the_expert_and_the_full_product_has_the_prior():
    """MoPoE as published: q(z | x_m) of a singleton subset is the expert itself (no N(0, I)); the
    product of all modalities includes it (bug: the prior in every product, or in none)."""
    mu, lv = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [0.0]])  # two unit-variance experts
    mopoe = FUSIONS["mopoe"]
    m, v = mopoe.product(mu, lv, torch.tensor([True, False]))
    assert (m.item(), v.exp().item()) == (1.0, 1.0)
    m, v = mopoe.product(mu, lv, torch.tensor([True, True]))
    assert m.item() == pytest.approx(4.0 / 3.0) and v.exp().item() == pytest.approx(1.0 / 3.0)
    m, v = FUSIONS["poe"].product(mu, lv, torch.tensor([True, False]))  # MVAE's placement: prior everywhere
    assert m.item() == pytest.approx(0.5) and v.exp().item() == pytest.approx(0.5)


def test_mixture_of_experts_draws_each_given_expert_uniformly():
    """Two far-apart experts: about half of the draws come from each; a masked-out expert never
    (bug: the PoE instead of the mixture, or a non-uniform choice)."""
    mu = torch.tensor([[[-10.0], [10.0], [50.0]]]).expand(4000, 3, 1)
    lv = torch.full_like(mu, -4.0)
    q = mixture_of_experts(mu, lv, torch.tensor([True, True, False]).expand(4000, 3))
    torch.manual_seed(0)
    z = q.sample().squeeze(-1)
    frac = (z > 0).float().mean().item()
    assert abs(frac - 0.5) < 4 * (0.25 / 4000) ** 0.5
    assert (z.abs() < 12).all()  # never the masked-out expert at 50
    torch.testing.assert_close(q.mean, torch.zeros(4000, 1))  # the average of the given means
    with pytest.raises(ValueError, match="no expert to mix"):
        mixture_of_experts(mu[:1], lv[:1], torch.zeros(1, 3, dtype=torch.bool))


def test_make_fusion_from_names_mappings_and_overrides():
    assert make_fusion("moe") == FUSIONS["moe"] and make_fusion("moe").conditional == "mixture"
    f = make_fusion({"name": "mopoe", "prior_expert": "every", "subsets": None, "subset_strategy": "enumerate"})
    assert (f.prior_expert, f.subsets, f.subset_strategy) == ("every", "all", "enumerate")
    assert make_fusion("mopoe", prior_expert=False).prior_expert == "none"  # bools: True every, False none
    custom = make_fusion({"name": "tempered", "combine": lambda mu, lv, mask, prior: poe(mu, lv + 1.0, mask, prior)})
    assert custom.prior_expert == "full" and custom.subsets == "all"  # an unnamed fusion starts from the defaults
    with pytest.raises(ValueError, match="unknown fusion 'pie'"):
        make_fusion("pie")
    with pytest.raises(ValueError, match="unknown fusion settings \\['prior'\\]"):
        make_fusion({"name": "mopoe", "prior": "full"})
    with pytest.raises(ValueError, match="unknown prior expert placement"):
        Fusion("x", prior_expert="sometimes")
    with pytest.raises(ValueError, match="unknown fusion product rule"):
        Fusion("x", combine="sum")
    with pytest.raises(ValueError, match="unknown conditional"):
        Fusion("x", conditional="poe")
