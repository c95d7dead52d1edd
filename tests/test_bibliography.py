"""The bibliography's author-year labels: the ones the text's citations print."""

import sys
from pathlib import Path

import pytest
from pybtex.database import Entry, Person, parse_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from book_sphinx import AuthorYearLabels  # noqa: E402


def entry(key, authors, year):
    e = Entry("misc", fields={"title": key, "year": year},
              persons={"author": [Person(a) for a in authors]})
    e.key = key
    return e


def test_labels_follow_the_number_of_authors():
    entries = [entry("a", ["Dao, Tri"], "2023a"), entry("b", ["Dao, Tri", "Fu, Dan"], "2022"),
               entry("c", ["Kwon, W", "Li, Z", "Zhuang, S"], "2023")]
    assert list(AuthorYearLabels().format_labels(entries)) == [
        "Dao, 2023a", "Dao and Fu, 2022", "Kwon et al., 2023"]


def test_two_works_with_one_label_stop_the_build():
    entries = [entry("x", ["NVIDIA"], "2023"), entry("y", ["NVIDIA"], "2023")]
    with pytest.raises(ValueError, match=r"\['x', 'y'\].*2023a"):
        list(AuthorYearLabels().format_labels(entries))


def test_every_entry_of_the_book_has_its_own_label():
    entries = list(parse_file(ROOT / "references.bib").entries.values())
    labels = list(AuthorYearLabels().format_labels(entries))
    assert len(set(labels)) == len(entries)
