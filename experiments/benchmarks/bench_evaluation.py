#!/usr/bin/env python
r"""Cost of the standard evaluation protocol on a PolyMNIST-sized model, and of diffusion decoding.

**Model.** ``experiment=polymnist_mopoe_cpu`` built by :func:`pyro_diffmvae.builders.build_model`
(5 modalities 3 x 28 x 28, feed-forward decoders), randomly initialised; no data is read: the test
(and training) examples are random images in [-1, 1] with random digit labels.

**Evaluation.** :func:`pyro_diffmvae.evaluation.routines.evaluate_with_labels` under
``evaluation.protocol=standard`` on the first ``N`` examples (``--num-examples``, default 10,000, the
PolyMNIST test split) × all 30 given subsets, both coherence conventions, balanced accuracy and the
seeded bootstrap (``--bootstrap`` resamples) of F1 and FD, timed (through
:func:`~pyro_diffmvae.evaluation.routines.evaluate`, the joint NLL included) with the transposed
convolutions channels-last (``evaluation.channels_last``; ``--compare-channels-last`` also times
them without and prints the ratio), and with the FD bootstrap
(``evaluation.fd_bootstrap``). The label classifiers are trained first (a few steps, on
random images, cached in a temporary folder) and are not part of the timed evaluation.

**Image decoders.** ``--image-decoders conv compact`` times the same protocol, one after the other in
this run, with each feed-forward image decoder of ``model.image_decoder`` (the preset's ``conv``:
22.4 M multiply-adds per 28-px image; ``compact``: 2.3 M, the size of the MoPoE authors' PolyMNIST
decoder), printing each one's multiply-adds per image (``torch.utils.flop_counter``) and the ratio of
the times.

**Diffusion decoding.** One PolyMNIST diffusion decoder of ``experiment=polymnist_diffmvae_star_cpu``
generates ``--diffusion-images`` images with DDIM-50; the time per 1,000 images is extrapolated
linearly from that measured count (printed with it).

Example::

    python experiments/benchmarks/bench_evaluation.py --num-examples 1000 --threads 1 --compare-channels-last
    python experiments/benchmarks/bench_evaluation.py --num-examples 10000 --image-decoders compact --skip-fd-bootstrap
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from _hardware import hardware_lines, setup_device  # noqa: E402  (script dir on sys.path)


class RandomPolyMNIST(torch.utils.data.Dataset):
    """``size`` random PolyMNIST-shaped examples (images uniform in [-1, 1], random digits)."""

    def __init__(self, size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(5, size, 3, 28, 28, generator=g) * 2 - 1
        self.labels = torch.randint(0, 10, (size,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        out = {f"m{k}": self.images[k, i] for k in range(5)}
        out["meta"] = {"label": self.labels[i], "index": i}
        return out


def compose(preset: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return hydra_compose("config", overrides=[f"experiment={preset}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=10000)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--diffusion-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-fd-bootstrap", action="store_true", help="time only without the FD bootstrap")
    parser.add_argument("--compare-channels-last", action="store_true",
                        help="also time evaluation.channels_last=false in the same run (the speed-up ratio)")
    parser.add_argument("--image-decoders", nargs="+", default=["conv"],
                        help="model.image_decoder values to time, side by side in this run (conv, compact)")
    args = parser.parse_args()
    from pyro_diffmvae.nets.decoders import IMAGE_DECODERS

    unknown = [d for d in args.image_decoders if d not in IMAGE_DECODERS]
    if unknown:
        raise SystemExit(f"--image-decoders: unknown {unknown}; known: {sorted(IMAGE_DECODERS)}")
    if args.num_examples < 2:
        raise SystemExit(f"--num-examples must be >= 2, got {args.num_examples}")
    device = setup_device(args.threads, "cpu")
    print("\n".join(hardware_lines(device)))

    from pyro_diffmvae.builders import build_model
    from pyro_diffmvae.evaluation.routines import evaluate

    cache = tempfile.mkdtemp(prefix="bench_evaluation_")
    test_set, train_set = RandomPolyMNIST(args.num_examples, 0), RandomPolyMNIST(1000, 1)

    def cfg(fd_bootstrap: bool, channels_last: bool = True, image_decoder: str = "conv"):
        return compose("polymnist_mopoe_cpu", "evaluation.protocol=standard", f"evaluation.bootstrap={args.bootstrap}",
                       f"evaluation.channels_last={str(channels_last).lower()}",
                       f"evaluation.fd_bootstrap={str(fd_bootstrap).lower()}", "evaluation.balanced_accuracy=true",
                       f"evaluation.batch_size={args.batch_size}", "evaluation.classifier_steps=5",
                       "evaluation.classifier_train_size=1000", "evaluation.probe_train_size=1000",
                       f"evaluation.classifier_cache={cache}", f"model.image_decoder={image_decoder}")

    settings = ([(False, True)] + ([(False, False)] if args.compare_channels_last else [])
                + ([] if args.skip_fd_bootstrap else [(True, True)]))
    seconds = {}
    for i, image_decoder in enumerate(args.image_decoders):
        torch.manual_seed(0)
        vae = build_model(cfg(False, image_decoder=image_decoder))
        with FlopCounterMode(display=False) as counter:
            vae.modalities["m0"].decoder.net(torch.zeros(1, vae.latent_dim))
        print(f"\nimage decoder {image_decoder} ({type(vae.modalities['m0'].decoder.net).__name__}): "
              f"{counter.get_total_flops() // 2:,} multiply-adds per 28-px image")
        if i == 0:  # the classifiers, trained once and cached, serve every decoder's evaluation
            start = time.perf_counter()
            evaluate(vae, RandomPolyMNIST(8, 2), train_set, cfg(False, image_decoder=image_decoder), Path(cache),
                     figures=False)
            print(f"classifiers trained and cached (not timed below): {time.perf_counter() - start:.1f} s")
        for fd_bootstrap, channels_last in settings:
            start = time.perf_counter()
            metrics = evaluate(vae, test_set, train_set, cfg(fd_bootstrap, channels_last, image_decoder), Path(cache),
                               figures=False)
            key = image_decoder, fd_bootstrap, channels_last
            seconds[key] = time.perf_counter() - start
            print(f"standard protocol, feed-forward PolyMNIST model ({image_decoder} image decoders): "
                  f"{metrics['num_examples']} examples x {metrics['protocol']['num_given_subsets']} given subsets, "
                  f"bootstrap {args.bootstrap}, FD bootstrap {'on' if fd_bootstrap else 'off'}, channels_last "
                  f"{'on' if channels_last else 'off'}: {seconds[key]:.1f} s")
        if args.compare_channels_last:
            print(f"channels_last speed-up ({image_decoder}, same run, FD bootstrap off): "
                  f"{seconds[image_decoder, False, False] / seconds[image_decoder, False, True]:.2f}x")
    first = args.image_decoders[0]
    for other in args.image_decoders[1:]:
        print(f"{first} / {other} time (same run, FD bootstrap off, channels_last on): "
              f"{seconds[first, False, True] / seconds[other, False, True]:.2f}x")

    dcfg = compose("polymnist_diffmvae_star_cpu")
    decoder = build_model(dcfg).modalities["m0"].decoder.eval()
    z = torch.randn(args.diffusion_images, dcfg.model.latent_dim)
    with torch.no_grad():
        decoder.generate(z[:1], sampler="ddim", steps=2)  # warm-up
        start = time.perf_counter()
        decoder.generate(z, sampler="ddim", steps=50)
        seconds = time.perf_counter() - start
    print(f"diffusion decoder (polymnist_diffmvae_star_cpu UNet), DDIM-50: {seconds:.2f} s for {args.diffusion_images} "
          f"images measured -> {1000 * seconds / args.diffusion_images:.0f} s per 1,000 images (linear extrapolation)")


if __name__ == "__main__":
    main()
