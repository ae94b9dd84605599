"""A griffe extension for the API reference: the docstrings write math as reST (``:math:`...```
inline, ``.. math::`` blocks, as Sphinx reads it); mkdocstrings renders Markdown, so each docstring's
math is rewritten to the ``$...$`` / ``$$...$$`` that ``pymdownx.arithmatex`` hands to MathJax.
Only the rendered pages change; the source docstrings stay reST."""

from __future__ import annotations

import re

_INLINE = re.compile(r":math:`([^`]+)`")
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+.*\n|[ \t]*\n)+)", re.M)


def rest_math_to_markdown(text: str) -> str:
    """``:math:`x``` -> ``$x$``; an indented ``.. math::`` block -> a ``$$ ... $$`` block."""
    def block(m: re.Match) -> str:
        body = "\n".join(line.strip() for line in m.group("body").strip("\n").splitlines())
        return f"{m.group('indent')}$$\n{body}\n$$\n\n"

    return _INLINE.sub(lambda m: f"${m.group(1)}$", _BLOCK.sub(block, text))


try:  # the docs build has griffe; the test of the rewriting above does not need it
    import griffe
except ImportError:
    griffe = None

if griffe is not None:
    class ReSTMath(griffe.Extension):
        def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
            if obj.docstring is not None:
                obj.docstring.value = rest_math_to_markdown(obj.docstring.value)
