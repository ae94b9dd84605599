import pytest
import torch

from torch.utils.flop_counter import FlopCounterMode

from pyro_diffmvae.nets.decoders import CompactConvDecoder, ConvDecoder, MLPDecoder, TokenDecoder
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


def _multiply_adds(net, *inputs):
    with FlopCounterMode(display=False) as counter:
        net(*inputs)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("size, maps", [(28, [4, 7, 14, 28]), (32, [4, 8, 16, 32]), (64, [4, 8, 16, 32, 64]),
                                        (12, [3, 6, 12])])
def test_compact_decoder_reaches_every_size_through_the_halved_sizes(size, maps):
    # Catches a wrong output padding (a 28-px decoder giving 32 px, or 27) and a size sequence that rounds down.
    net = CompactConvDecoder(16, 3, size, width=8)
    seen = [net.start_shape[1]]
    for layer in net.net:
        if isinstance(layer, torch.nn.ConvTranspose2d):
            seen.append(seen[-1] * 2 - 1 + layer.output_padding[0])
    assert seen == maps
    assert net(torch.randn(2, 16)).shape == (2, 3, size, size)
    with pytest.raises(ValueError, match="image size above 4"):
        CompactConvDecoder(16, 3, 4)


def test_compact_decoder_costs_the_hand_counted_multiply_adds():
    # At 28 px, width 32: 128x4x4 -> 64x7x7 -> 32x14x14 -> 3x28x28 by 3x3 transposed convolutions, each
    # in_pixels * 9 * c_in * c_out, plus the linear layer 32 * 2048 (the MoPoE PolyMNIST decoder's size); the
    # conv decoder, 4x4 kernels from 4x4 to 32x32 (128 -> 128 -> 64 -> 32) and a 3x3 conv to 3 channels, ten
    # times more. Catches channels that do not halve, an extra layer, or a changed default decoder.
    z = torch.randn(1, 32)
    compact = 16 * 9 * 128 * 64 + 49 * 9 * 64 * 32 + 196 * 9 * 32 * 3 + 32 * 2048
    assert compact == 2_317_696 and _multiply_adds(CompactConvDecoder(32, 3, 28), z) == compact
    conv = 32 * 256 + 256 * 2048 + 16 * 16 * 128 * 128 + 64 * 16 * 128 * 64 + 256 * 16 * 64 * 32 + 1024 * 9 * 32 * 3
    assert _multiply_adds(ConvDecoder(32, 3, 28), z) == conv == 22_388_736
