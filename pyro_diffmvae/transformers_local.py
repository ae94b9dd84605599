"""``transformers`` imported lazily, and pretrained models and tokenisers read from local folders only.

The BERT / GPT-2 text networks (:mod:`pyro_diffmvae.nets.text`), the caption codec
(:mod:`pyro_diffmvae.caption_codec`) and the CLIP score (:mod:`pyro_diffmvae.metrics.clip_score`)
import ``transformers`` through :func:`require_transformers`, so that the package imports without it
(``pip install transformers``), and read their folders through :func:`local_model_dir`: nothing is
downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["local_model_dir", "require_transformers"]


def require_transformers():
    """Import and return ``transformers``; ImportError with the install command when it is missing."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the BERT/GPT-2 text models need the 'transformers' package: pip install transformers"
        ) from e
    return transformers


def local_model_dir(local_dir: str | os.PathLike, what: str) -> Path:
    """``local_dir`` as a ``Path``; FileNotFoundError naming ``what`` when the folder does not exist."""
    path = Path(local_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: the local model folder {os.fspath(path)!r} does not exist; give a folder written by "
            f"save_pretrained (config.json and the weights). Nothing is downloaded."
        )
    return path
