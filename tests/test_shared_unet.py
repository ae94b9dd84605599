"""model.unet.shared: one UNet for the diffusion modalities of one image shape, each with its own learned
offset of z (pyro_diffmvae/nets/shared_unet.py), saved and loaded with the tie intact."""

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from pyro_diffmvae.builders import build_model
from pyro_diffmvae.io import tied_weight_names
from pyro_diffmvae.nets.shared_unet import ModalityOffset
from pyro_diffmvae.nets.unet import ConditionalUNet
from pyro_diffmvae.pretrained import WEIGHTS_NAME, from_pretrained, save_pretrained
from pyro_diffmvae.settings import check_settings

IMAGES = ["m0", "m1", "m2", "m3", "m4"]


def _cfg(*overrides):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=["experiment=polymnist_diffmvae_star_cpu", *overrides])


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def _unet(vae, m):
    return vae.modalities[m].decoder.eps_net.net


def _wake(unet):
    """Random output weights (a UNet starts with conv_out = 0, whose output depends on nothing)."""
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    return unet


def test_one_unet_for_the_five_images_and_the_parameter_count_of_the_tie():
    # Catches: a UNet per modality despite the key (no tie), a tie across image shapes, or offsets missing:
    # the shared model holds four UNets fewer than the unshared one and one D-vector offset per image modality more.
    torch.manual_seed(0)
    own, shared = build_model(_cfg()), build_model(_cfg("model.unet.shared=true"))
    assert all(_unet(shared, m) is _unet(shared, "m0") for m in IMAGES)
    one_unet = _numel(own.modalities["m0"].decoder.eps_net)
    D = shared.latent_dim
    assert _numel(shared) == _numel(own) - 4 * one_unet + 5 * D
    assert len(shared.modalities["m0"].decoder.eps_net.offset) == D


def test_each_modality_sees_the_shared_network_at_z_plus_its_offset():
    # Catches: the offset not added (all modalities identical), added to x or t instead of z, or the same
    # offset for every modality.
    torch.manual_seed(0)
    unet = ConditionalUNet(in_channels=3, image_size=8, z_dim=4, base_channels=8, channel_mults=(1, 2),
                           num_res_blocks=1, attention_resolutions=(), z_spatial_channels=2)
    _wake(unet)
    a, b = ModalityOffset(unet, 4), ModalityOffset(unet, 4)
    x, z, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4), torch.tensor([0.3, 0.7])
    torch.testing.assert_close(a(x, z, t), unet(x, z + a.offset, t), rtol=0, atol=0)
    assert not torch.allclose(a(x, z, t), b(x, z, t))
    with pytest.raises(ValueError, match=r"needs z of shape \(B, 4\)"):
        a(x, torch.randn(2, 5), t)


def test_gradients_of_both_modalities_add_in_the_shared_network_and_not_in_the_other_offset():
    # Catches: copies instead of a tie (m1's loss would not reach m0's network), or one offset shared by all
    # (m0's loss would move m1's offset).
    torch.manual_seed(0)
    vae = build_model(_cfg("model.unet.shared=true"))
    x, z, t = torch.randn(2, 3, 28, 28), torch.randn(2, vae.latent_dim), torch.tensor([0.2, 0.6])
    net = _wake(_unet(vae, "m0"))
    first = net.conv_in.weight

    def grad_of(*mods):
        vae.zero_grad(set_to_none=True)
        sum(vae.modalities[m].decoder.eps_net(x, z, t).square().sum() for m in mods).backward()
        return (None if first.grad is None else first.grad.clone(),
                {m: vae.modalities[m].decoder.eps_net.offset.grad for m in IMAGES})

    g0, off0 = grad_of("m0")
    g1, _ = grad_of("m1")
    g01, _ = grad_of("m0", "m1")
    torch.testing.assert_close(g01, g0 + g1)
    assert off0["m1"] is None and off0["m0"] is not None and off0["m0"].abs().sum() > 0


def test_save_pretrained_stores_the_shared_network_once_and_loading_restores_the_tie(tmp_path):
    # Catches: safetensors refusing the tied tensors (it does for two names of one tensor), a file with five
    # copies, or a loaded model whose decoders got five separate networks (training it would untie them).
    torch.manual_seed(0)
    cfg = _cfg("model.unet.shared=true")
    vae = build_model(cfg).eval()
    _wake(_unet(vae, "m0"))
    aliases = tied_weight_names(vae)
    assert aliases and all(".eps_net.net." in a for a in aliases)
    save_pretrained(vae, tmp_path / "pretrained", cfg)
    stored = load_file(str(tmp_path / "pretrained" / WEIGHTS_NAME))
    assert not set(aliases) & set(stored)
    assert sum(k.startswith("modalities.m0.decoder.eps_net.net.") for k in stored) == len(_unet(vae, "m0").state_dict())
    loaded, _ = from_pretrained(tmp_path / "pretrained")
    assert all(_unet(loaded, m) is _unet(loaded, "m0") for m in IMAGES)
    x, z, t = torch.randn(2, 3, 28, 28), torch.randn(2, vae.latent_dim), torch.tensor([0.5, 0.5])
    for m in ("m0", "m4"):
        torch.testing.assert_close(loaded.modalities[m].decoder.eps_net(x, z, t), vae.modalities[m].decoder.eps_net(x, z, t))


def test_the_key_must_be_a_boolean():
    # Catches: "true" (a string) or 1 accepted and read as truthy.
    for bad in ("model.unet.shared=yes", "model.unet.shared=1"):
        with pytest.raises(ValueError, match=r"model.unet.shared=.*must be true or false"):
            check_settings(_cfg(bad), "train")
    assert tied_weight_names(build_model(_cfg())) == {}  # unshared: nothing tied


def test_the_ema_of_a_shared_unet_is_the_ema_of_its_weights(tmp_path):
    # Each modality keeps its own average of the (shared) network; they see the same weights after every step,
    # so all averages agree and copying them back in at the end gives the EMA of the shared weights.
    # Catches: averages that drift apart (e.g. updated from different networks) or a copy-back that leaves the
    # shared network at its last iterate or at one modality's stale average.
    import lightning as L
    import pyro
    from torch.utils.data import DataLoader

    from pyro_diffmvae.train import DiffMVAEModule, make_trainer

    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = build_model(_cfg("model.unet.shared=true", "model.unet.channel_mults=[1]", "model.unet.base_channels=8"))
    module = DiffMVAEModule(vae, lr=1e-2, ema_decay=0.5)
    net = _unet(vae, "m0")
    snapshots = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append([p.detach().clone() for p in net.parameters()])

    data = [{m: torch.rand(3, 28, 28) * 2 - 1 for m in IMAGES} for _ in range(8)]
    trainer = make_trainer(max_steps=3, default_root_dir=str(tmp_path), enable_progress_bar=False,
                           enable_checkpointing=False, logger=False, callbacks=[Record()])
    trainer.fit(module, DataLoader(data, batch_size=4))
    expected = [0.25 * a + 0.25 * b + 0.5 * c for a, b, c in zip(*snapshots)]  # decay 0.5 over w1, w2, w3
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    assert all(_unet(vae, m) is net for m in IMAGES)  # still one network after the copy-back
