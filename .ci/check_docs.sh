#!/usr/bin/env bash
# Documentation check (run by .ci/run): build the mkdocs site with --strict in a fresh virtual
# environment, so that a broken reference, an unparsable docstring field or a missing page fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/docs-env"
"$work/docs-env/bin/pip" install -q -r docs/requirements.txt
NO_MKDOCS_2_WARNING=1 "$work/docs-env/bin/mkdocs" build --strict --site-dir "$work/site"
echo "docs check: mkdocs build --strict passed"
