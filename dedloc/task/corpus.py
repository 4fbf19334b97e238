"""The embedded offline corpus: natural-language text that ships with dedloc.

`embedded/python-docs-prose.txt` holds one paragraph per line of English prose from the Python
documentation as CPython 3.11.7 carries it (Python Software Foundation License Version 2 — see
``embedded/README.md``): the Language Reference and library topics of ``Lib/pydoc_data/topics.py``,
then the docstrings of the standard library's public modules, classes and functions. Code samples,
grammar rules and short fragments are left out.

The file is committed so that every peer reads byte-identical text whatever Python it runs;
:func:`extract_prose` is how it was made, and ``python -m dedloc.task.corpus OUT`` regenerates it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_CORPUS = EMBEDDED_DIR / "python-docs-prose.txt"


def _prose_paragraphs(text: str, allow_indented: bool) -> list[str]:
    found = []
    for block in re.split(r"\n\s*\n", text):
        if ">>>" in block or "::=" in block:
            continue  # interactive examples and grammar rules
        lines = block.split("\n")
        if not allow_indented and any(line.startswith("    ") for line in lines):
            continue  # code
        paragraph = re.sub(r"^[*\-] ", "", " ".join(line.strip() for line in lines).strip())
        if len(paragraph) < 60 or not paragraph[0].isalpha():
            continue
        if not paragraph.rstrip(")\"'").endswith((".", ":", "?")):
            continue
        if sum(c.isalpha() or c in " ,.'\"" for c in paragraph) / len(paragraph) < 0.88:
            continue  # mostly symbols: code, tables
        found.append(paragraph)
    return found


def _stdlib_docstrings() -> list[str]:
    import contextlib
    import importlib
    import inspect
    import io
    import warnings

    skip = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "venv", "this", "antigravity", "pydoc_data")
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name.startswith(skip):
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:
            continue
        members = [module] + [
            value for key, value in vars(module).items()
            if not key.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
            and getattr(value, "__module__", None) == name
        ]
        docs.extend(doc for doc in map(inspect.getdoc, members) if doc)
    return docs


def extract_prose() -> list[str]:
    """Prose paragraphs of this interpreter's documentation topics and stdlib docstrings, deduplicated."""
    import pydoc_data.topics as topics

    paragraphs: list[str] = []
    for key in sorted(topics.topics):
        paragraphs.extend(_prose_paragraphs(topics.topics[key], allow_indented=True))
    for doc in _stdlib_docstrings():
        paragraphs.extend(_prose_paragraphs(doc, allow_indented=False))
    return list(dict.fromkeys(paragraphs))


def embedded_corpus_path() -> Path:
    """Path of the shipped corpus file (one paragraph per line)."""
    if not EMBEDDED_CORPUS.is_file():
        raise FileNotFoundError(f"the embedded corpus is missing from the installation: {EMBEDDED_CORPUS}")
    return EMBEDDED_CORPUS


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else EMBEDDED_CORPUS
    out.write_text("\n".join(extract_prose()) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
