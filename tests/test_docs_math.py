"""The API reference's math: the docstrings' reST math rewritten for MathJax (docs/griffe_math.py)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("griffe_math", Path(__file__).resolve().parents[1] / "docs" / "griffe_math.py")
griffe_math = importlib.util.module_from_spec(spec)
spec.loader.exec_module(griffe_math)


def test_inline_and_block_math_become_dollar_math():
    """Catches: a role left as literal ``:math:`` text on the site, a block whose indented body is
    cut at its blank line, or the text after a block swallowed into it."""
    doc = ("Minus the loss :math:`\\lambda(t)` per example.\n\n"
           "    .. math::\n\n"
           "        -\\Big[C(x) + \\frac1K\\sum_k\n"
           "        \\big(\\|\\hat\\epsilon\\|^2\\big)\\Big],\n\n"
           "    with :math:`K` draws.\n")
    out = griffe_math.rest_math_to_markdown(doc)
    assert out == ("Minus the loss $\\lambda(t)$ per example.\n\n"
                   "    $$\n-\\Big[C(x) + \\frac1K\\sum_k\n\\big(\\|\\hat\\epsilon\\|^2\\big)\\Big],\n$$\n\n"
                   "    with $K$ draws.\n")
