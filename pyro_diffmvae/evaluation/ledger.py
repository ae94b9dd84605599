r"""The bound ledger: what was trained and what each reported number estimates (``metrics["ledger"]``).

* ``model`` — the model preset's name and what it is (:func:`model_identity`): the paper's Diff-MVAE* or
  Diff-MVAE, this library's Diff-MVAE*-v, or a baseline, and whether the run's weighting and prediction
  target are the ones that name stands for;
* ``objective`` — the training objective (its name and repr); ``is_bound`` —
  :meth:`~pyro_diffmvae.objectives.Objective.is_bound`: whether −loss estimates a lower bound on
  :math:`\log p(x)` (only the ELBO with β ≥ 1, every λ_m = 1 and every diffusion decoder with the
  likelihood weighting, and the baselines' bound cases);
* ``beta``, ``likelihood_weights`` (λ_m), and for each diffusion decoder its λ(t) weighting and
  prediction target (``diffusion_decoders``);
* ``protocol`` (:mod:`~pyro_diffmvae.evaluation.protocol`) and ``conditional`` (:func:`conditional_name`);
* ``estimators`` — in words, what each likelihood number estimates; ``evaluation_networks`` — where
  each label classifier comes from (``label_classifiers``: ``{modality: "published (<name> from
  <path>)" | "trained by this run (cache <path>)" | ...}``), the Fréchet distance's name and feature
  space (``fd_feature_space``), the FID Inception weights file and the CLIP model; ``as_published``:
  whether the samples are read by the networks the published tables use (published classifiers, FID
  if any FD) — the data and the protocol may still differ.

The objective is the one the run trained with (``diffmvae-train`` passes it; ``diffmvae-evaluate``
rebuilds it from the run's config); without one, the objective bound to ``vae.conditional`` by
:func:`~pyro_diffmvae.objectives.bind_objective` / ``build_model`` is used.
"""

from __future__ import annotations

from ..data.registry import get_dataset
from ..objectives.base import Objective
from .frechet import fd_feature_space

__all__ = ["conditional_name", "trained_objective", "evaluation_networks", "bound_ledger", "model_identity",
           "DIFFUSION_PRESETS"]

#: the diffusion-decoder model presets: name -> (weighting, prediction target, what the name stands for)
DIFFUSION_PRESETS = {
    "diffmvae_star": ("simple", "eps", "the paper's Diff-MVAE*: the unweighted eps-MSE (not a bound), eps-prediction"),
    "diffmvae": ("likelihood", "eps", "the paper's Diff-MVAE: the likelihood weighting lambda = g^2 (a bound), "
                                      "eps-prediction"),
    "diffmvae_star_v": ("v_mse", "v", "Diff-MVAE*-v, this library's recommended variant: the v-MSE weighting (not a "
                                      "bound) with v-prediction; not the paper's objective"),
    "diffmvae_vpred": ("likelihood", "v", "the paper's Diff-MVAE objective (the likelihood weighting lambda = g^2, a "
                                          "bound) computed from a v-predicting network: the paper's objective, another "
                                          "parameterisation"),
    "diffmvae_star_vpred": ("simple", "v", "the paper's Diff-MVAE* objective (the unweighted eps-MSE, not a bound) "
                                           "computed from a v-predicting network: the paper's objective, another "
                                           "parameterisation"),
}


def trained_objective(vae, objective=None) -> Objective | None:
    """``objective``, else the :class:`Objective` whose ``conditional`` is ``vae.conditional``."""
    if objective is not None:
        return objective
    owner = getattr(getattr(vae, "conditional", None), "__self__", None)
    return owner if isinstance(owner, Objective) else None


def conditional_name(vae) -> str:
    """Which conditional q(z | x_given) ``vae.posterior`` / ``vae.generate`` use, in words: the
    two-stage models' own, the training objective's (an override of
    :meth:`Objective.conditional`: product or mixture of the given experts), or the fusion's."""
    if hasattr(vae, "stage1") and hasattr(vae, "joint_dim"):  # a TwoStageVAE
        return (f"two-stage ({vae.stage1} stage 1): the given modalities' own latents, the others completed by the "
                "stage-2 joint latent diffusion's conditional sampler")
    objective = trained_objective(vae)
    fusion = vae.fusion
    if objective is not None and type(objective).conditional is not Objective.conditional:
        kind = objective.conditional_kind or f"{type(objective).__name__}.conditional (its own)"
        extra = ""
        if kind == "product" and hasattr(objective, "prior_expert"):
            extra = f", prior expert {'in' if objective.prior_expert else 'not in'} the product"
        return f"{kind} of the given experts ({type(objective).__name__}.conditional{extra})"
    if fusion.conditional == "mixture":
        return f"mixture of the given experts (fusion {fusion.name})"
    return f"product of the given experts (fusion {fusion.name}, prior expert: {fusion.prior_expert})"


def model_identity(cfg, vae=None) -> str:
    """What the run's model preset ``cfg.model.name`` is, in words; for a diffusion preset whose weighting or
    prediction target was changed (``weighting=...``, ``model.diffusion.prediction=...``) it says so, so that
    no table calls a changed objective by the paper's name."""
    name = cfg.model.get("name", "?")
    if name not in DIFFUSION_PRESETS:
        return f"{name}"
    weighting, prediction, meaning = DIFFUSION_PRESETS[name]
    if vae is not None and not any(m.is_diffusion for m in vae.modalities.values()):
        return f"{name} with feed-forward decoders only (model.diffusion_decoders=false): not {meaning.split(':')[0]}"
    ran_weighting = cfg.weighting.get("name") if cfg.weighting.get("fn") is None else f"custom ({cfg.weighting.fn})"
    ran_prediction = cfg.model.diffusion.get("prediction", "eps")
    changed = []
    if ran_weighting != weighting:
        changed.append(f"weighting {ran_weighting} instead of {weighting}: a different objective")
    if ran_prediction != prediction:
        changed.append(f"prediction {ran_prediction} instead of {prediction}: the same objective, another parameterisation")
    if not changed:
        return f"{name} — {meaning}"
    return f"{name} as changed by this run ({'; '.join(changed)}) — the preset alone is {meaning}"


def bound_ledger(vae, cfg, metrics: dict, objective=None) -> dict:
    """The ledger of a run (module docstring)."""
    objective = trained_objective(vae, objective)
    beta = getattr(objective, "beta", None)
    beta = float(vae.beta if beta is None else beta)
    decoders = {}
    for m, modality in vae.modalities.items():
        if modality.is_diffusion:
            decoder = modality.decoder
            weighting = decoder.likelihood_kwargs["weighting"]
            decoders[m] = {"weighting": weighting if isinstance(weighting, str) else repr(weighting),
                           "prediction": decoder.prediction, "log_prob_is_bound": bool(decoder.is_bound),
                           "log_prob": decoder.objective}
    estimators = {"-loss": ("the training objective's loss per example; a lower bound on log p(x) only where "
                            "is_bound is true")}
    for key in metrics:
        if key.endswith("_reconstruction_bound_bpd"):
            estimators[key] = ("a reconstruction bound, not a bound on -log p(x): the score-matching bound of "
                               "-log p(x^m | z) with the likelihood weighting and all its constants, dequantised, in "
                               "bits/dim, at the posterior mean z = E q(z | all modalities, x^m included), Monte Carlo "
                               "over diffusion times (mean ± SE over the test images)")
    joint = metrics.get("joint_log_likelihood") or {}
    if joint.get("supported"):
        estimators["joint_log_likelihood"] = (
            f"{joint['estimator']} on {joint['examples']} dequantised test examples (mean ± SE over them); "
            f"{'a stochastic lower bound on log p(x)' if joint['is_lower_bound'] else 'not a bound on log p(x)'}, "
            f"{'converging' if joint['converges'] else 'not converging'} to it as K grows")
    protocol = metrics.get("protocol", {})
    return {
        "model": model_identity(cfg, vae),
        "objective": None if objective is None else getattr(objective, "name", type(objective).__name__),
        "objective_repr": None if objective is None else repr(objective),
        "is_bound": None if objective is None else bool(objective.is_bound(vae)),
        "beta": beta,
        "likelihood_weights": {m: float(modality.weight) for m, modality in vae.modalities.items()},
        "diffusion_decoders": decoders,
        "protocol": protocol.get("label"),
        "conditional": conditional_name(vae),
        "estimators": estimators,
        "evaluation_networks": evaluation_networks(cfg, metrics),
    }


def evaluation_networks(cfg, metrics: dict) -> dict:
    """Which networks read the generated samples (module docstring): ``label_classifiers`` (source per
    modality), ``fd_name``, ``fd_feature_space``, ``fid_inception_weights``, ``clip_model``,
    ``published_classifiers`` (the name of the data set's released classifiers, ``None`` if it has none)
    and ``as_published`` (``True`` when every label classifier is published and the FD, if any, is FID)."""
    info = metrics.get("classifier") or {}
    sources = {m: i.get("source") for m, i in info.items() if isinstance(i, dict)}
    fd_name = metrics.get("fd_name")
    published = all(str(s).startswith("published") for s in sources.values())
    evaluation = get_dataset(cfg).evaluation
    released = getattr(evaluation, "published_classifiers", None)
    return {"label_classifiers": sources, "fd_name": fd_name, "fd_feature_space": fd_feature_space(cfg.evaluation, fd_name),
            "fid_inception_weights": cfg.evaluation.get("fid_inception_weights", None),
            "clip_model": metrics.get("clip_model"), "published_classifiers": None if released is None else released.name,
            "as_published": published and fd_name in (None, "FID")}
