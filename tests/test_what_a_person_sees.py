"""What a person looks at (issue 16, item 7): the loss curves (one panel per term, training and
validation on the same axes, a grid rather than one row: 12 panels in one 3,744 x 288 row were
unreadable), the report's links to its figures, and progress bars for the prior fit and the evaluation."""

from PIL import Image

from pyro_diffmvae.figures import loss_curve_panels, save_loss_curves

CSV = """epoch,step,train/loss,train/loglik/image,val/loss,val/loglik/image,train/kl,lr
0,0,5.0,-3.0,,,1.0,
0,1,4.0,,,,,
0,1,,,4.5,-2.5,,
0,2,3.0,-2.0,,,0.5,0.01
0,2,2.5,,,,,
"""


def test_panels_pair_train_and_validation_of_each_term_and_keep_a_steps_last_value(tmp_path):
    """Catches: train/ and val/ of a term on separate panels, a nested term (loglik/image) split at
    its last slash instead of its first, a repeated step plotted twice, the loss not first."""
    path = tmp_path / "metrics.csv"
    path.write_text(CSV)
    assert list(loss_curve_panels(path))[0] == "loss"
    assert loss_curve_panels(path) == {
        "loss": {"train": [(0, 5.0), (1, 4.0), (2, 2.5)], "val": [(1, 4.5)]},
        "kl": {"train": [(0, 1.0), (2, 0.5)]},
        "loglik/image": {"train": [(0, -3.0), (2, -2.0)], "val": [(1, -2.5)]},
        "lr": {"": [(2, 0.01)]},
    }


def test_the_figure_is_a_grid_of_at_most_four_panels_a_row(tmp_path):
    """Catches: every panel in one row (the figure's width grows with the number of terms)."""
    header = ["epoch", "step"] + [f"{split}/term{k}" for k in range(10) for split in ("train", "val")]
    rows = [",".join(["0", str(s)] + [str(s * 0.1 + k)] * 20) for s, k in zip(range(3), range(3))]
    path = tmp_path / "metrics.csv"
    path.write_text(",".join(header) + "\n" + "\n".join(rows) + "\n")
    assert save_loss_curves(path, tmp_path / "curves.png")
    width, height = Image.open(tmp_path / "curves.png").size
    assert (width, height) == (round(3.4 * 4 * 110), round(2.6 * 3 * 110))  # 10 panels: 4 columns, 3 rows
    assert not save_loss_curves(tmp_path / "missing.csv", tmp_path / "none.png")


def test_the_report_links_the_figures_that_exist_beside_it(tmp_path):
    """Catches: a report that names no figure, or links one that was not written (a broken image)."""
    from pyro_diffmvae.evaluation.report import write_report

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "conditional.png").write_bytes(b"png")
    (tmp_path / "loss_curves.png").write_bytes(b"png")
    write_report({}, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "![Conditional generation](figures/conditional.png)" in text
    assert "![Loss curves (training and validation)](loss_curves.png)" in text
    assert "unconditional.png" not in text  # not written, not linked


def test_the_latent_prior_fit_shows_a_progress_bar_only_when_asked(capsys):
    """Catches: a silent fit of thousands of steps, or a bar printed when progress bars are off."""
    import torch

    from pyro_diffmvae import LatentMLP, LatentScorePrior

    prior = LatentScorePrior(2, LatentMLP(2, hidden=8, num_blocks=1), fitted=False)
    prior.fit(torch.randn(16, 2), steps=7, batch_size=8, progress=True)
    err = capsys.readouterr().err
    assert "fitting LatentScorePrior" in err and "7/7" in err and "loss=" in err
    prior.fit(torch.randn(16, 2), steps=3, batch_size=8)
    assert capsys.readouterr().err == ""


def test_the_evaluation_shows_a_progress_bar_over_its_chunks_only_when_asked(capsys):
    import torch

    from pyro_diffmvae.evaluation.routines import test_chunks

    data = [{"x": torch.full((2,), float(i))} for i in range(10)]
    chunks = list(test_chunks(data, 10, 4, progress=True))
    assert [start for start, _ in chunks] == [0, 4, 8] and chunks[-1][1]["x"].shape == (2, 2)
    err = capsys.readouterr().err
    assert "evaluating 10 test examples" in err and "3/3" in err
    list(test_chunks(data, 10, 4))
    assert capsys.readouterr().err == ""
