
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


def test_report_names_the_protocol_shows_standard_errors_and_the_ledger(tmp_path):
    """Catches: a report without its protocol, numbers printed without their SE (or the SE as a column
    of its own), a ledger left out of report.md, and the reconstruction bound called a likelihood
    bound; metrics.json from before the rename (``<m>_bound_bpd``) must still be reported."""
    from pyro_diffmvae.evaluation.protocol import resolve_protocol

    protocol = resolve_protocol({"protocol": "quick"}, 100, ["m0", "m1", "m2"]).record()
    metrics = {"num_examples": 64, "protocol": protocol, "sampler": "ddim", "sampler_steps": 50,
               "conditional": {"m0": {"coherence": 0.5, "coherence_se": 0.0625, "m1_coherence": 0.25}},
               "coherence_by_num_given": {"1": 0.5}, "coherence_by_num_given_se": {"1": 0.0625},
               "coherence_all_targets_by_num_given": {"1": 0.4}, "coherence_all_targets_by_num_given_se": {"1": 0.05},
               "image_bound_bpd": {"mean": 4.2, "se": 0.1, "examples": 8},
               "ledger": {"objective": "elbo", "objective_repr": "ELBO(num_particles=1)", "is_bound": False, "beta": 1.0,
                          "likelihood_weights": {"m0": 1.0}, "protocol": "quick",
                          "diffusion_decoders": {"m0": {"weighting": "v_mse", "prediction": "v", "log_prob_is_bound": False}},
                          "conditional": "product of the given experts (fusion mopoe, prior expert: full)",
                          "estimators": {}, "evaluation_networks": {}}}
    write_report(metrics, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "Evaluation protocol: **quick**." in text and "64 of 100 test examples, 4 of 6 given subsets" in text
    assert "| given | coherence | m1_coherence |" in text and "| m0 | 0.500 ± 0.062 | 0.250 |" in text
    assert "| missing targets only | 0.500 ± 0.062 |" in text and "| all targets | 0.400 ± 0.050 |" in text
    assert "## Bound ledger" in text and "−loss bounds log p(x): **no**" in text
    assert "λ(t) weighting v_mse, predicts v" in text and "product of the given experts (fusion mopoe" in text
    assert "image decoder: reconstruction bound 4.200 ± 0.100 bits/dim" in text and "not on −log p(x)" in text
