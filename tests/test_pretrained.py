"""Portable model folders (safetensors + JSON): the round trip gives the same model and the same
generations from the same seed; a wrong format version, damaged files and an occupied folder are
errors that name the problem (issue 16, item 4)."""

import json

import pyro
import pytest
import torch
from hydra import compose, initialize_config_module

from pyro_diffmvae import from_pretrained, save_pretrained
from pyro_diffmvae.builders import build_latent_prior, build_model
from pyro_diffmvae.pretrained import FORMAT_VERSION


def tiny_model(model="diffmvae_star"):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", f"model={model}"])
    torch.manual_seed(0)
    vae = build_model(cfg)
    prior = build_latent_prior(cfg)
    prior.fit(torch.randn(64, cfg.model.latent_dim), steps=3, batch_size=16)
    vae.latent_prior = prior
    return vae.eval(), cfg


def draws(vae, seed=5):
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    return vae.sample(3, prior="score", steps=3, prior_steps=3)


@pytest.mark.parametrize("model", ["diffmvae_star", "mmvae_plus"])
def test_round_trip_same_weights_and_same_generations(tmp_path, model):
    """Catches: a weight left out (the latent prior, a private latent's net), a config that rebuilds
    other networks, or a reload whose sampling differs from the saved model's."""
    vae, cfg = tiny_model(model)
    save_pretrained(vae, tmp_path / "m", cfg)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    header_len = int.from_bytes((tmp_path / "m" / "model.safetensors").read_bytes()[:8], "little")
    assert (tmp_path / "m" / "model.safetensors").read_bytes()[8:9] == b"{" and header_len > 0  # safetensors, no pickle
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["latent_prior"] is True
    loaded, loaded_cfg = from_pretrained(tmp_path / "m")
    assert loaded_cfg.model.name == model and loaded.latent_prior.fitted
    mine, theirs = vae.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    a, b = draws(vae), draws(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_version_damaged_files_and_an_occupied_folder_are_named(tmp_path):
    vae, cfg = tiny_model()
    folder = save_pretrained(vae, tmp_path / "m", cfg)
    with pytest.raises(FileExistsError, match="already holds .*nothing is overwritten"):
        save_pretrained(vae, folder, cfg)
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=rf"folder format {FORMAT_VERSION + 1}.*reads format {FORMAT_VERSION}"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 3}))  # some other library's config
    with pytest.raises(ValueError, match="is not a pyro-diffmvae model config"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(meta))
    (folder / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has a config but no weights"):
        from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="is not a pretrained pyro-diffmvae folder"):
        from_pretrained(tmp_path / "nowhere")
