import pytest
import torch

from pyro_diffmvae.nets.decoders import ConvDecoder, MLPDecoder, TokenDecoder
from pyro_diffmvae.nets.encoders import ConvEncoder, MLPEncoder, TokenEncoder


@pytest.mark.parametrize("size", [28, 32, 64])
def test_conv_encoder_decoder_shapes(size):
    enc = ConvEncoder(3, size, 16)
    mu, logvar = enc(torch.randn(2, 3, size, size))
    assert mu.shape == logvar.shape == (2, 16)
    assert logvar.abs().max() <= 10.0
    assert ConvDecoder(16, 1, size)(mu).shape == (2, 1, size, size)
    with pytest.raises(ValueError, match=r"expects \(batch, 3, 28, 28\)|expects \(batch, 3, 32, 32\)|expects \(batch, 3, 64, 64\)"):
        enc(torch.randn(2, 1, size, size))


def test_vector_and_token_nets():
    mu, lv = MLPEncoder(17, 8)(torch.rand(5, 17))
    assert mu.shape == (5, 8)
    assert MLPDecoder(8, 17)(mu).shape == (5, 17)
    mu, lv = TokenEncoder(20, 8, 6)(torch.randint(0, 20, (3, 8)))
    assert mu.shape == (3, 6)
    assert TokenDecoder(6, 8, 20)(mu).shape == (3, 8, 20)


def test_logvar_soft_clamp_bounds_extremes():
    enc = MLPEncoder(2, 1)
    with torch.no_grad():
        enc.net[-1].bias.fill_(1e4)
    mu, lv = enc(torch.zeros(1, 2))
    assert lv.item() == pytest.approx(10.0) and torch.isfinite(mu).all()
