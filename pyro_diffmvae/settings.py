"""The apps' settings checked before any work starts: known keys, numeric ranges, names.

``diffmvae-train`` used to find a bad setting only where it was read — ``evaluation.sampler_steps=0``
after training and the latent prior's fit, ``trainer.max_steps=0`` never (a finished run that trained
nothing), ``+trainer.max_stepz=3`` never (hydra's ``+`` appends any key). :func:`check_settings` reads
every setting once, at the start of each app, and raises one ``ValueError`` that names each bad key,
its value and what it must be.

Why a table here and not hydra structured configs: the configs are plain YAML that users copy,
extend from their own search path (``docs/extending.md``) and override by name; a dataclass schema
per config group would have to mirror every option of every group. The sections whose keys do not
depend on the chosen options (``trainer``, ``latent_prior``, ``evaluation``, ``sample``, the top
level) are checked for unknown keys against the package's own YAML files; ``model.*`` and
``dataset.*`` differ between options and are checked where they are read (the builders).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

__all__ = ["check_settings", "known_keys", "SECTIONS"]

CONFIGS = Path(__file__).resolve().parent / "configs"

#: the config sections each app reads (and so checks)
SECTIONS = {
    "train": ("trainer", "latent_prior", "evaluation", "model"),
    "evaluate": ("evaluation",),
    "sample": ("sample",),
}

_MISSING = object()


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _positive_int(value) -> str | None:
    return None if _int(value) and value >= 1 else "a positive integer"


def _optional_positive_int(value) -> str | None:
    return None if value is None or (_int(value) and value >= 1) else "a positive integer or null"


def _non_negative_int(value) -> str | None:
    return None if _int(value) and value >= 0 else "an integer >= 0"


def _positive_real(value) -> str | None:
    return None if _real(value) and 0 < value < float("inf") else "a finite number > 0"


def _non_negative_real(value) -> str | None:
    return None if _real(value) and 0 <= value < float("inf") else "a finite number >= 0"


def _optional_non_negative_real(value) -> str | None:
    return None if value is None or _non_negative_real(value) is None else "a finite number >= 0 or null"


def _optional_start_time(value) -> str | None:
    return None if value is None or (_real(value) and 0 < value <= 1) else "a time in (0, 1] or null (off)"


def _probability_below_one(value) -> str | None:
    return None if _real(value) and 0.0 <= value < 1.0 else "a probability in [0, 1)"


def _optional_decay(value) -> str | None:
    return None if value is None or (_real(value) and 0 < value < 1) else "a number in (0, 1) or null (off)"


def _bootstrap(value) -> str | None:
    return None if _int(value) and (value == 0 or value >= 2) else "0 (no bootstrap) or an integer >= 2"


def _optional_duration(value) -> str | None:
    """Lightning's ``max_time``: ``"DD:HH:MM:SS"`` with a positive total."""
    if value is None:
        return None
    parts = str(value).split(":") if isinstance(value, str) else []
    if len(parts) == 4 and all(p.isdigit() for p in parts) and any(int(p) for p in parts):
        return None
    return 'null or a positive duration "DD:HH:MM:SS" (e.g. "00:00:10:00" for ten minutes)'


def _boolean(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _one_of(*choices: str) -> Callable[[object], str | None]:
    def check(value) -> str | None:
        return None if value in choices else f"one of {list(choices)}"
    return check


def _sampler(value) -> str | None:
    from .samplers import SAMPLERS

    return None if value in SAMPLERS else f"a sampler name, one of {sorted(SAMPLERS)}"


def _protocol(value) -> str | None:
    from .evaluation.protocol import PROTOCOLS

    return None if value in PROTOCOLS else f"a protocol name, one of {sorted(PROTOCOLS)}"


#: key -> its rule (a function returning what the value must be, or None when it is fine). A key
#: absent from the config (e.g. ``model.two_stage.*`` for a one-stage model) is not checked.
RULES: dict[str, Callable[[object], str | None]] = {
    # training
    "trainer.max_steps": _positive_int,
    "trainer.max_time": _optional_duration,
    "trainer.batch_size": _positive_int,
    "trainer.lr": _positive_real,
    "trainer.weight_decay": _non_negative_real,
    "trainer.gradient_clip_val": _optional_non_negative_real,
    "trainer.ema_decay": _optional_decay,
    "trainer.devices": _positive_int,
    "trainer.num_nodes": _positive_int,
    "trainer.accumulate_grad_batches": _positive_int,
    "trainer.num_workers": _non_negative_int,
    "trainer.val_every_n_steps": _positive_int,
    "trainer.val_batches": _positive_int,
    "trainer.log_every_n_steps": _positive_int,
    "trainer.log_parts_every": _positive_int,
    "trainer.nonfinite": _one_of("stop", "skip"),
    "trainer.max_nonfinite": _non_negative_int,
    "trainer.kl_warmup_steps": _non_negative_int,
    "trainer.diffusion_warmup_steps": _non_negative_int,
    # the latent score prior
    "latent_prior.hidden": _positive_int,
    "latent_prior.num_blocks": _positive_int,
    "latent_prior.steps": _positive_int,
    "latent_prior.batch_size": _positive_int,
    "latent_prior.lr": _positive_real,
    "latent_prior.ema_decay": _optional_decay,
    "latent_prior.samples_per_example": _positive_int,
    "latent_prior.sampler": _sampler,
    "latent_prior.sampler_steps": _positive_int,
    # the model's samplers and sizes
    "model.latent_dim": _positive_int,
    "model.beta": _non_negative_real,
    "model.diffusion.sampler": _sampler,
    "model.diffusion.sampler_steps": _positive_int,
    "model.diffusion.num_draws": _positive_int,
    "model.diffusion.cond_dropout": _probability_below_one,
    "model.unet.shared": _boolean,
    "model.unet.hint": _boolean,
    "model.unet.hint_residual": _boolean,
    "model.diffusion.guidance": _non_negative_real,
    "model.two_stage.sampler": _sampler,
    "model.two_stage.sampler_steps": _positive_int,
    "model.two_stage.prior_steps": _optional_positive_int,
    # evaluation
    "evaluation.protocol": _protocol,
    "evaluation.num_examples": _optional_positive_int,
    "evaluation.max_subsets_per_size": _optional_positive_int,
    "evaluation.num_unconditional": _positive_int,
    "evaluation.batch_size": _positive_int,
    "evaluation.sampler": _sampler,
    "evaluation.sampler_steps": _positive_int,
    "evaluation.guidance": _optional_non_negative_real,
    "evaluation.sample_precision": _one_of("fp32", "bf16"),
    "evaluation.hint_start": _optional_start_time,
    "evaluation.bootstrap": _bootstrap,
    "evaluation.loglik_examples": _non_negative_int,
    "evaluation.loglik_samples": _positive_int,
    "evaluation.loglik_decoder": _one_of("bound", "ode"),
    "evaluation.loglik_draws": _positive_int,
    "evaluation.bpd_examples": _non_negative_int,
    "evaluation.bpd_draws": _positive_int,
    "evaluation.classifier_steps": _positive_int,
    "evaluation.classifier_train_size": _positive_int,
    "evaluation.probe_train_size": _positive_int,
    # diffmvae-sample
    "sample.num": _positive_int,
    "sample.prior": _one_of("score", "normal"),
    "sample.sampler": _sampler,
    "sample.steps": _positive_int,
    "sample.guidance": _optional_non_negative_real,
    "sample.sample_precision": _one_of("fp32", "bf16"),
    "sample.hint_start": _optional_start_time,
}


@lru_cache(maxsize=None)
def known_keys() -> dict[str, frozenset[str]]:
    """The keys each option-independent section may hold: those of the package's own YAML files
    (``trainer/cpu.yaml``, which ``gpu`` and ``ddp`` extend, and ``config.yaml``); ``""`` is the top level."""
    main = OmegaConf.load(CONFIGS / "config.yaml")
    trainer = set(OmegaConf.load(CONFIGS / "trainer" / "cpu.yaml"))
    for extra in ("gpu.yaml", "ddp.yaml"):
        trainer |= {k for k in OmegaConf.load(CONFIGS / "trainer" / extra) if k != "defaults"}
    top = {k for k in main if k not in ("defaults", "hydra")} | {"dataset", "model", "weighting", "fusion", "trainer", "logger"}
    return {"": frozenset(top), "trainer": frozenset(trainer),
            **{s: frozenset(main[s]) for s in ("latent_prior", "evaluation", "sample")}}


def _unknown_keys(cfg: DictConfig, sections: Sequence[str]) -> list[str]:
    problems = []
    known = known_keys()
    for section in ("", *sections):
        if section not in known:
            continue
        node = cfg if section == "" else cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        for key in node:
            if key not in known[section]:
                name = f"{section}.{key}" if section else str(key)
                close = difflib.get_close_matches(str(key), sorted(known[section]), n=1)
                hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
                problems.append(f"{name}: unknown setting{hint}")
    return problems


def check_settings(cfg: DictConfig, app: str) -> None:
    """Raise one ``ValueError`` listing every unknown key and every value out of range among the
    settings that ``app`` (``"train"``, ``"evaluate"`` or ``"sample"``) reads; return ``None`` when all
    are fine. Nothing is coerced: ``"0.1"`` is not a number here, ``true`` is not an integer."""
    if app not in SECTIONS:
        raise ValueError(f"unknown app {app!r}; known: {sorted(SECTIONS)}")
    sections = SECTIONS[app]
    problems = _unknown_keys(cfg, sections)
    for key, rule in RULES.items():
        if key.split(".", 1)[0] not in sections:
            continue
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        must = rule(value)
        if must is not None:
            problems.append(f"{key}={value!r}: must be {must}")
    if app == "train":
        problems += _guidance_without_dropout(cfg) + _settings_that_need_a_hint(cfg)
    if problems:
        raise ValueError("bad settings (nothing was run):\n  " + "\n  ".join(problems))


def _guidance_without_dropout(cfg: DictConfig) -> list[str]:
    """``evaluation.guidance = w ≠ 1`` needs the null latent that only conditioning dropout
    (``model.diffusion.cond_dropout > 0``) trains: without it the evaluation after training would refuse the
    weight, after the whole training had run. (``diffmvae-evaluate`` and ``-sample`` read the trained model's
    dropout from its checkpoint and refuse there, before generating anything.)"""
    w = OmegaConf.select(cfg, "evaluation.guidance", default=None)
    p = OmegaConf.select(cfg, "model.diffusion.cond_dropout", default=0.0)
    diffusion = OmegaConf.select(cfg, "model.diffusion_decoders", default=False)
    enabled = OmegaConf.select(cfg, "evaluation.enabled", default=True)
    if (enabled and diffusion and isinstance(w, (int, float)) and not isinstance(w, bool) and w != 1
            and isinstance(p, (int, float)) and p == 0):
        return [f"evaluation.guidance={w!r}: needs a model trained with model.diffusion.cond_dropout > 0 (the null "
                "latent of the unconditional half); this one trains with cond_dropout=0, so its evaluation would fail "
                "after training"]
    return []


def _settings_that_need_a_hint(cfg: DictConfig) -> list[str]:
    """``model.objective=elbo_hint`` trains the hint decoders that only ``model.unet.hint=true`` gives the diffusion
    decoders (:mod:`~pyro_diffmvae.nets.hint`); without them its hint term would be empty. Likewise
    ``model.unet.hint_residual=true`` subtracts a hint that only ``model.unet.hint=true`` builds."""
    objective = OmegaConf.select(cfg, "model.objective", default="elbo")
    hint = OmegaConf.select(cfg, "model.unet.hint", default=False)
    diffusion = OmegaConf.select(cfg, "model.diffusion_decoders", default=False)
    residual = OmegaConf.select(cfg, "model.unet.hint_residual", default=False)
    problems = []
    if objective == "elbo_hint" and not (hint is True and diffusion is True):
        problems.append("model.objective='elbo_hint': needs hinted diffusion decoders (model.diffusion_decoders=true "
                        f"and model.unet.hint=true); this model has diffusion_decoders={diffusion!r}, unet.hint={hint!r}")
    if residual is True and hint is not True:
        problems.append(f"model.unet.hint_residual=true: denoises x minus the hint and needs model.unet.hint=true; "
                        f"this model has unet.hint={hint!r}")
    return problems
