r"""A user's data set outside the package (the test template of ``tests/test_extension_dataset.py``).

``toy``: example ``i`` has the label ``y = i mod 3`` and two modalities,

* ``vector`` — float32 ``(5,)``: ``2 onehot(y) - 1`` in the first three entries, two standard-normal
  noise entries after them (normal likelihood); read back as the argmax of the first three;
* ``label`` — float32 ``(3,)``: ``onehot(y)`` (Bernoulli likelihood); read back as its argmax and
  scored by F1.

The config names it by ``dataset.spec._target_=toy_dataset.make_spec`` (``configs/dataset/toy.yaml``).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from pyro_diffmvae.data.spec import DatasetSpec, EvaluationSpec, LabelSpec, ModalitySpec

NUM_CLASSES = 3


class ToyDataset(Dataset):
    """``size`` examples ``{"vector", "label", "meta": {"label", "index"}}``, deterministic from ``seed``."""

    def __init__(self, size: int, seed: int, modalities=("vector", "label")):
        g = torch.Generator().manual_seed(int(seed))
        self.labels = torch.arange(int(size)) % NUM_CLASSES
        onehot = torch.nn.functional.one_hot(self.labels, NUM_CLASSES).float()
        self.data = {"vector": torch.cat([2 * onehot - 1, torch.randn(int(size), 2, generator=g)], 1), "label": onehot}
        self.modalities = tuple(modalities)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        out = {m: self.data[m][i] for m in self.modalities}
        out["meta"] = {"label": self.labels[i], "index": i}
        return out


def build(cfg):
    d = cfg.dataset
    return tuple(ToyDataset(size, d.seed * 10 + k, d.modalities)
                 for k, size in enumerate((d.train_size, d.val_size, d.test_size)))


def argmax_of_first_three(x: torch.Tensor) -> torch.Tensor:
    return x[:, :NUM_CLASSES].argmax(-1, keepdim=True)


def modalities(cfg) -> dict[str, ModalitySpec]:
    return {"vector": ModalitySpec((5,), "normal", read=argmax_of_first_three),
            "label": ModalitySpec((NUM_CLASSES,), "bernoulli", read=argmax_of_first_three, f1=True)}


def label_of(batch) -> torch.Tensor:
    return batch["meta"]["label"].reshape(-1, 1).long()


def make_spec() -> DatasetSpec:
    labels = LabelSpec((NUM_CLASSES,), label_of)
    return DatasetSpec(name="toy", title="toy", build=build, modalities=modalities,
                       evaluation=EvaluationSpec("labels", labels=lambda cfg, train_set: labels))
