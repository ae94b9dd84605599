"""bf16 sampling of diffusion decoders (pyro_diffmvae.sampling_precision): the network under autocast, the
sampler in float32, the setting carried to evaluation, sampling and the tables."""

import pytest
import torch
from torch import nn

from pyro_diffmvae.modality import DiffusionDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE
from pyro_diffmvae.sampling_precision import AutocastEps, sample_precision


class LinearEps(nn.Module):
    """ε̂(x, z, t) = W x + b: one linear layer, so the bf16 result can be computed by hand."""

    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, d)

    def forward(self, x, z, t):
        return self.lin(x)


def test_autocast_eps_runs_the_network_in_bf16_and_returns_float32():
    """Under CPU autocast a linear layer computes with bf16-rounded inputs and weights; AutocastEps's value is that
    one, cast to float32. Catches autocast not entered (the float32 value, which differs), the output left in bf16,
    or the cast applied to the input only."""
    net = LinearEps()
    x = torch.randn(8, 16)
    out = AutocastEps(net, torch.bfloat16)(x, None, torch.rand(8))
    by_hand = nn.functional.linear(x.bfloat16(), net.lin.weight.bfloat16(), net.lin.bias.bfloat16()).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    assert (out - net(x, None, None)).abs().max() > 1e-4  # bf16 is visibly not float32 here


def _vae_with_spy(seen, **decoder_kwargs):
    def spy(x, z, t):
        seen.append((x.dtype, x.shape[0], torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return 2.0 * x + z.sum(-1, keepdim=True)

    decoder = DiffusionDecoder(spy, (3,), weighting="simple", sampler="ddim", sampler_steps=3, **decoder_kwargs)
    enc = nn.Linear(3, 4)
    encoder = lambda x: (enc(x)[:, :2], enc(x)[:, 2:])  # noqa: E731
    return MultimodalVAE([Modality("a", encoder, decoder)], latent_dim=2), decoder


def test_decoder_generates_with_its_network_under_bf16_autocast_and_its_sampler_in_float32():
    """Every network call of generate is under bf16 autocast when sample_precision="bf16", never with "fp32"; the
    sampler's state (the network's input) and the samples stay float32; with guidance the 2n-row guided call is the
    one autocast. Catches the setting ignored, autocast leaking outside the network (a bf16 sampler state) or the
    guided network bypassing it."""
    seen = []
    _, dec = _vae_with_spy(seen, cond_dropout=0.1, latent_dim=2)
    dec.eval()
    z = torch.randn(5, 2)
    assert dec.generate(z).dtype == torch.float32
    assert seen and all(enabled is False for _, _, enabled, _ in seen)
    seen.clear()
    dec.sample_precision = "bf16"
    x = dec.generate(z)
    assert x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    assert seen and all(dtype == torch.float32 and enabled and ad == torch.bfloat16 for dtype, _, enabled, ad in seen)
    seen.clear()
    dec.guidance = 2.0
    dec.generate(z)
    assert seen and all(n == 10 and enabled for _, n, enabled, _ in seen)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_sampling_warns_where_the_cpu_has_no_bf16_kernels_and_only_there(monkeypatch, native):
    """On a CPU whose oneDNN reports no bf16 support (measured 8.4x slower than float32 on an AVX2 EPYC) a bf16
    generate warns, naming the setting and the way out; with bf16 kernels, or in float32, it does not. Catches
    the warning missing (a silent slow-down of an evaluation), shown for fp32, or shown on a CPU with kernels."""
    import warnings

    import pyro_diffmvae.sampling_precision as sp

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native, raising=False)
    assert sp.bf16_is_native("cpu") is native
    _, dec = _vae_with_spy([])
    dec.eval()
    z = torch.randn(4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec.generate(z)  # fp32: never a warning
        dec.sample_precision = "bf16"
        dec.generate(z)
    messages = [str(w.message) for w in caught if "bf16" in str(w.message)]
    if native:
        assert messages == []
    else:
        assert len(messages) == 1 and "sample_precision='fp32'" in messages[0] and "emulated" in messages[0]


def test_sample_precision_sets_every_diffusion_decoder_and_restores_it():
    """Catches a context manager that leaves bf16 on after the block (later fp32 numbers silently in bf16) or
    sets nothing; None keeps each decoder's own."""
    vae, dec = _vae_with_spy([])
    with sample_precision(vae, "bf16") as used:
        assert used == {"a": "bf16"} and dec.sample_precision == "bf16"
    assert dec.sample_precision == "fp32"
    with pytest.raises(RuntimeError):
        with sample_precision(vae, "bf16"):
            raise RuntimeError
    assert dec.sample_precision == "fp32"
    with sample_precision(vae, None) as used:
        assert used == {"a": "fp32"}


@pytest.mark.parametrize("name", ["fp16", "bfloat16", 16, None])
def test_unknown_precisions_are_named(name):
    with pytest.raises(ValueError, match=r"unknown sample precision .*known: \['bf16', 'fp32'\]"):
        DiffusionDecoder(lambda x, z, t: x, (3,), sample_precision=name)
    if name is not None:
        with pytest.raises(ValueError, match="unknown sample precision"):
            with sample_precision(_vae_with_spy([])[0], name):
                pass


def test_evaluate_samples_in_the_configured_precision_and_reports_it(monkeypatch, tmp_path):
    """evaluation.sample_precision=bf16 is in force while the data set's routine generates, restored after it,
    recorded in metrics["sample_precision"] and named in the tables' what-ran cell. Catches the key read but never
    applied to the decoders, applied after the routine, or a bf16 evaluation labelled as a float32 one."""
    from omegaconf import OmegaConf

    from conftest import load_paper_tables, toy_evaluation

    paper_tables = load_paper_tables()
    vae, dec = _vae_with_spy([])
    during = []

    def routine(vae, test_set, train_set, cfg, out_dir, figures=True):
        during.append(dec.sample_precision)
        return {"sampler": "ddim", "sampler_steps": 3}

    evaluate = toy_evaluation(monkeypatch, routine)
    cfg = OmegaConf.create({"evaluation": {"sample_precision": "bf16", "guidance": None, "batch_size": 4}})
    metrics = evaluate(vae, None, None, cfg, tmp_path)
    assert during == ["bf16"] and dec.sample_precision == "fp32"
    assert metrics["sample_precision"] == {"a": "bf16"}
    assert paper_tables.what_ran(metrics) == "toy, not a bound; ddim 3 steps, bf16 networks"
