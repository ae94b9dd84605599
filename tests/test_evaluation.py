
import torch

from pyro_diffmvae.data import shapes
from pyro_diffmvae.evaluation import _agreement, given_subsets, mask_to_factors, write_report


def test_mask_geometry_reads_shape_size_and_position():
    data = shapes.generate_shapes(648, image_size=32, seed=3)
    read = mask_to_factors(data["mask"])
    truth = data["factors"]
    assert (read[:, 1] == -1).all()  # a mask carries no colour
    for j in [0, 2, 3, 4]:
        acc = (read[:, j] == truth[:, j]).float().mean().item()
        assert acc > 0.97, (j, acc)
    assert (mask_to_factors(torch.zeros(2, 1, 32, 32)) == -1).all()


def test_agreement_and_given_subsets():
    a = torch.tensor([[0, 1, 0, 2, 1], [1, 2, 1, 0, 0]])
    m = torch.tensor([[0, -1, 0, 2, 1], [1, -1, 0, 0, 0]])  # second disagrees on size
    assert _agreement({"attributes": a, "mask": m}) == 0.5
    assert given_subsets(["a", "b", "c"]) == [("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c")]


def test_report_tables(tmp_path):
    metrics = {"num_examples": 10, "sampler": "ddim", "sampler_steps": 50,
               "conditional": {"image": {"attributes_f1": 0.91, "mask_f1": 0.88}, "mask": {"image_factor_acc": 0.7}},
               "unconditional": {"normal": {"agreement": 0.1, "FD_classifier": 3.0}, "score": {"agreement": 0.4, "FD_classifier": 1.0}},
               "fd_name": "FD_classifier", "image_reconstruction_bound_bpd": {"mean": 4.2, "se": 0.1, "examples": 8}}
    write_report(metrics, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "| image | 0.910 |  | 0.880 |" in text
    assert "| latent score prior | 1.000 | 0.400 |" in text
    assert "not Inception FID" in text and "4.200 ± 0.100 bits/dim" in text
