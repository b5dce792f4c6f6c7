"""Write a corpus of real English prose from text every CPython installation carries, for the
results on a pretrained model (docs/results.md) on a machine without network access.

    python scripts/english_corpus.py --out cache/english.jsonl

Sources, in order: the Python Language Reference and library topics that ``help()`` shows
(``pydoc_data.topics``), the license texts under /usr/share/common-licenses (where present), and
the docstrings of the pure-Python standard library modules. Each paragraph of at least
``--min-chars`` characters is one JSON line ``{"text": ..., "source": ...}``; repeated paragraphs
are written once. The document-hash split of ``crossint harvest`` then holds out about 10% of the
paragraphs for evaluation.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
SKIPPED_MODULES = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                   "antigravity", "this", "__main__", "__phello__", "pydoc_data")


def paragraphs(text: str, min_chars: int) -> Iterator[str]:
    """Blank-line separated paragraphs with whitespace collapsed, prose only (mostly letters)."""
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(block.split())
        letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
        if len(paragraph) >= min_chars and letters >= 0.85 * len(paragraph):
            yield paragraph


def pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def license_texts() -> Iterator[tuple[str, str]]:
    if LICENSES.is_dir():
        for path in sorted(p for p in LICENSES.iterdir() if p.is_file()):
            yield f"license:{path.name}", path.read_text(encoding="utf-8", errors="replace")


def stdlib_docstrings() -> Iterator[tuple[str, str]]:
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in SKIPPED_MODULES)
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # platform modules that do not import here
            continue
        yield f"stdlib:{name}", inspect.getdoc(module) or ""
        for attribute, value in sorted(vars(module).items()):
            if (inspect.isclass(value) or inspect.isfunction(value)) and \
                    getattr(value, "__module__", None) == name and not attribute.startswith("_"):
                yield f"stdlib:{name}.{attribute}", inspect.getdoc(value) or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .jsonl file")
    parser.add_argument("--min-chars", type=int, default=200,
                        help="shortest paragraph kept (default %(default)s)")
    args = parser.parse_args()
    seen: set[str] = set()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with out.open("w", encoding="utf-8") as f:
        for source in (pydoc_topics(), license_texts(), stdlib_docstrings()):
            for where, text in source:
                for paragraph in paragraphs(text, args.min_chars):
                    if paragraph not in seen:
                        seen.add(paragraph)
                        f.write(json.dumps({"text": paragraph, "source": where}) + "\n")
                        kind = where.split(":")[0]
                        counts[kind] = counts.get(kind, 0) + len(paragraph)
    print(f"wrote {len(seen)} paragraphs, {sum(counts.values()):,} characters "
          f"({', '.join(f'{k} {v:,}' for k, v in counts.items())}) to {out}")


if __name__ == "__main__":
    main()
