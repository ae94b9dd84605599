#!/usr/bin/env bash
# Packaging check (run by .ci/run after the test suite): build the wheel and the sdist, check both with
# twine, install the wheel into a fresh virtual environment and run `diffmvae-train experiment=tiny`
# from outside the source tree, so that the configs must come from the wheel itself.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/build-env"
"$work/build-env/bin/pip" install -q build twine
"$work/build-env/bin/python" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$work/build-env/bin/twine" check --strict "$work"/dist/*
python3 -m venv "$work/wheel-env"
"$work/wheel-env/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$work/wheel-env/bin/pip" install -q "$work"/dist/*.whl
mkdir "$work/run" && cd "$work/run"
"$work/wheel-env/bin/python" -c "import pyro_diffmvae, importlib.metadata as m; assert pyro_diffmvae.__version__ == m.version('pyro-diffmvae'); print('installed pyro-diffmvae', pyro_diffmvae.__version__, 'from', pyro_diffmvae.__file__)"
OMP_NUM_THREADS=2 "$work/wheel-env/bin/diffmvae-train" experiment=tiny hydra.run.dir="$work/run/tiny" \
    dataset.cache_dir="$work/run/cache" evaluation.classifier_cache="$work/run/cls" > "$work/train.log" 2>&1 \
    || { tail -40 "$work/train.log"; exit 1; }
for f in model.pt pretrained/model.safetensors metrics.json report.md; do
    [ -e "$work/run/tiny/$f" ] || { echo "the wheel's diffmvae-train wrote no $f"; exit 1; }
done
echo "wheel check: built, twine-checked, installed and ran diffmvae-train experiment=tiny from the wheel"
