"""Sphinx extension for the book (loaded through `_config.yml`, `sphinx.local_extensions`).

- MathJax offline: the book's pages load MathJax 3 from `_static/mathjax/`, copied at the
  end of each HTML build from the PyPI package `django-static-mathjax` (pinned in
  requirements.lock), so formulas render without a network (docs/decisions.md).
- No Thebe: the book has no live-code button, but `sphinx-thebe` (always loaded by
  Jupyter Book) added its `THEBE_JS_URL` script to every page, twice; its handler is
  disconnected.
- Author-year bibliography labels: the `{bibliography}` lists each work as
  "[Kwon et al., 2023]", matching the author-year citations in the text
  (`bibtex_default_style: author_year_unsrt`); works by the same authors in the same
  year carry a letter in their year field, in both places.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle

MATHJAX_DIR = "mathjax"          # under _static; `mathjax_path` in _config.yml points here


def _mathjax_source() -> Path:
    import mathjax                # the package django-static-mathjax
    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def copy_mathjax(app, exception) -> None:
    """Copy MathJax's browser build into the HTML output's _static folder."""
    if exception is None and app.builder.format == "html":
        shutil.copytree(_mathjax_source(), Path(app.outdir) / "_static" / MATHJAX_DIR,
                        dirs_exist_ok=True)


def drop_thebe(app) -> None:
    """Disconnect sphinx-thebe's script injection (the book does not use Thebe)."""
    for listener in list(app.events.listeners.get("env-before-read-docs", [])):
        if getattr(listener.handler, "__qualname__", "") == "init_thebe_core":
            app.disconnect(listener.id)


def _plain(latex: str) -> str:
    return Text.from_latex(latex).render_as("text")


class AuthorYearLabels(BaseLabelStyle):
    """Labels "Dao, 2023", "Dao and Fu, 2022", "Kwon et al., 2023": the text's citations.

    The text's citations print the `year` field as it is, so works that would share a
    label carry their letter there (`year = {2023a}`); a build with two equal labels
    stops and names them, rather than letter the bibliography alone.
    """

    def format_labels(self, sorted_entries):
        entries = list(sorted_entries)
        labels = [self._label(entry) for entry in entries]
        shared = {label for label in labels if labels.count(label) > 1}
        if shared:
            keys = sorted(e.key for e, label in zip(entries, labels) if label in shared)
            raise ValueError(f"bibliography entries {keys} share the labels {sorted(shared)}: "
                             "add a letter to their year fields (2023a, 2023b)")
        yield from labels

    @staticmethod
    def _label(entry) -> str:
        persons = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_plain(" ".join(p.prelast_names + p.last_names)) for p in persons]
        if len(names) > 2:
            who = f"{names[0]} et al."
        else:
            who = " and ".join(names) or _plain(entry.fields.get("title", entry.key))
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearUnsrt(UnsrtStyle):
    """pybtex's unsrt style (arXiv ids as links through `eprint`), author-year labels."""

    default_label_style = "author_year_labels"


def setup(app):
    register_plugin("pybtex.style.labels", "author_year_labels", AuthorYearLabels)
    register_plugin("pybtex.style.formatting", "author_year_unsrt", AuthorYearUnsrt)
    drop_thebe(app)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
