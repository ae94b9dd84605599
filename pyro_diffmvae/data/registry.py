r"""The data sets by name: ``cfg.dataset`` → its :class:`~pyro_diffmvae.data.spec.DatasetSpec`.

:data:`DATASETS` maps a name to the spec its loader module declares (``shapes``, ``polymnist``,
``celebamask_hq``, ``cub``); :func:`register_dataset` adds one; :func:`get_dataset` looks one up.

**A user's data set, named in the config** (no edit of the package): the ``dataset`` config holds
a ``spec`` mapping whose hydra ``_target_`` names a callable returning the
:class:`~pyro_diffmvae.data.spec.DatasetSpec` (called with the mapping's other keys, if any); its
``name`` must equal ``dataset.name``. Every other key of ``dataset`` is the data set's own settings,
read by its ``build`` and ``modalities``; ``modalities`` and ``diffusion_modalities`` are read by the
builders too::

    # my_project/configs/dataset/toy.yaml
    name: toy
    spec: {_target_: my_project.toy.make_spec}
    modalities: [vector, label]
    diffusion_modalities: []
    train_size: 256

    diffmvae-train dataset=toy hydra.searchpath=[file:///abs/path/my_project/configs]

(``my_project`` importable: installed or on ``PYTHONPATH``; the spec is looked up again by
``diffmvae-evaluate`` / ``-sample`` from the config stored with the model). A module may instead call
``register_dataset(SPEC)`` when imported, and the config name it by ``dataset.name`` alone.
"""

from __future__ import annotations

from typing import Mapping

from omegaconf import OmegaConf

from . import celebamask_hq, cub, polymnist, shapes
from .spec import DatasetSpec

__all__ = ["DATASETS", "register_dataset", "get_dataset"]

#: name → spec of every registered data set
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (shapes.SPEC, polymnist.SPEC, celebamask_hq.SPEC, cub.SPEC)}


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under ``spec.name`` (``replace=True`` to replace a registered one)."""
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"register_dataset takes a DatasetSpec, got {type(spec).__name__}")
    if spec.name in DATASETS and not replace and DATASETS[spec.name] is not spec:
        raise ValueError(f"a data set named {spec.name!r} is already registered (replace=True to replace it)")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name_or_cfg) -> DatasetSpec:
    """The spec of a data set: a name of :data:`DATASETS`, a ``dataset`` config node, or a whole run config
    (its ``dataset``). A node with a ``spec: {_target_: ...}`` gives the spec that callable returns."""
    if isinstance(name_or_cfg, DatasetSpec):
        return name_or_cfg
    if isinstance(name_or_cfg, str):
        return _registered(name_or_cfg)
    is_mapping = isinstance(name_or_cfg, Mapping) or OmegaConf.is_dict(name_or_cfg)
    node = (name_or_cfg["dataset"] if "dataset" in name_or_cfg else name_or_cfg) if is_mapping else None
    if node is None or "name" not in node:
        raise ValueError(f"get_dataset takes a data-set name or a config with dataset.name, got {name_or_cfg!r}")
    spec_node = node.get("spec", None)
    if spec_node is None:
        return _registered(node["name"])
    return _instantiated(spec_node, node["name"])


def _registered(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (or give dataset.spec with a "
                         "_target_ naming a function that returns a DatasetSpec)")
    return DATASETS[name]


def _instantiated(spec_node, name: str) -> DatasetSpec:
    """The DatasetSpec a ``dataset.spec`` mapping's ``_target_`` returns, checked against ``dataset.name``."""
    if not ((OmegaConf.is_dict(spec_node) or isinstance(spec_node, Mapping)) and "_target_" in spec_node):
        raise ValueError(f"dataset.spec must be a mapping with a _target_ naming a function that returns a "
                         f"DatasetSpec, got {spec_node!r}")
    from hydra.utils import instantiate

    spec = instantiate(spec_node)
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"dataset.spec._target_={spec_node['_target_']} gave a {type(spec).__name__}, not a "
                        "pyro_diffmvae.data.spec.DatasetSpec")
    if spec.name != name:
        raise ValueError(f"dataset.spec._target_={spec_node['_target_']} gave the data set {spec.name!r}, "
                         f"but dataset.name is {name!r}")
    return spec
