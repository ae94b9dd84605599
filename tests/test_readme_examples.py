"""The README's Python examples run, in order, in one namespace (MultiVae issue #50: a quick-start that
broke unnoticed when an argument became required). The placeholders a reader fills in (their encoders,
data, loader, a run folder) are given small stand-ins here, and the sizes are cut (listed in SMALLER)
so that the examples take seconds; everything else is the README's text as it stands."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"

#: README text -> what runs here (sizes only; a README edit that drops one of these fails the test)
SMALLER = {
    "base_channels=32": "base_channels=8",
    "sampler_steps=50": "sampler_steps=2",
    "steps=1000": "steps=2",
    "fit(collect_latents(vae, loader))": "fit(collect_latents(vae, loader), steps=2)",
    "sample(16, prior=\"score\")": "sample(2, prior=\"score\", prior_steps=2)",
    "num_samples=64": "num_samples=2",
    'targets=["image"])': 'targets=["image"], num_samples=2)',
    'prior="score").bits_per_dim()': 'prior="score", num_samples=2, num_probes=1, rtol=1e-3, atol=1e-3).bits_per_dim()',
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class Encoder(nn.Module):
    """x -> (mu, logvar), the contract the README's ``my_*_encoder`` stand for."""

    def __init__(self, numel, d=32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(numel, 2 * d))

    def forward(self, x):
        return self.net(x).chunk(2, -1)


def reader_placeholders(tmp_path: Path) -> dict:
    from pyro_diffmvae import save_pretrained
    from pyro_diffmvae.builders import build_model
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny"])
    save_pretrained(build_model(cfg), tmp_path / "run" / "pretrained", cfg)
    g = torch.Generator().manual_seed(0)
    x_img = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    x_mask = (torch.rand(4, 1, 32, 32, generator=g) < 0.5).float()
    has_mask = torch.tensor([True, False, True, True])
    return {
        "my_image_encoder": Encoder(3 * 32 * 32), "my_mask_encoder": Encoder(32 * 32),
        "my_mask_net": nn.Sequential(nn.Linear(32, 32 * 32), nn.Unflatten(1, (1, 32, 32))),
        "x_img": x_img, "x_mask": x_mask, "has_mask": has_mask,
        "loader": [{"image": x_img, "mask": x_mask, "available": {"mask": has_mask}}],
    }


def test_the_readmes_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 4, "the README lost its Python examples"
    text = "\n".join(blocks)
    for readme_text in SMALLER:
        assert readme_text in text, f"SMALLER names {readme_text!r}, which the README no longer has"
    monkeypatch.chdir(tmp_path)
    namespace = reader_placeholders(tmp_path)
    torch.manual_seed(0)
    for k, block in enumerate(blocks):
        code = block.replace("outputs/<date>/<time>/pretrained", str(tmp_path / "run" / "pretrained"))
        for readme_text, small in SMALLER.items():
            code = code.replace(readme_text, small)
        try:
            exec(compile(code, f"README.md python block {k + 1}", "exec"), namespace)
        except Exception as err:  # name the block and its first line in the failure
            pytest.fail(f"README python block {k + 1} ({block.splitlines()[0]!r}) failed: {type(err).__name__}: {err}")
    assert (tmp_path / "my_model" / "model.safetensors").is_file()  # block 1 wrote its folder
    assert namespace["lik"].log_prob(namespace["x"]).shape == (4,)  # block 2's bound, one per image
