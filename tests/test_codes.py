"""Every standard code the node's report uses is confirmed by a dictionary that ships here: pydicom's code
dictionary or one of PixelMed's context groups, with the same meaning; every other code is private and listed in
docs/conformance.md."""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
from highdicom.sr import CodedConcept
from pydicom.sr._concepts_dict import concepts as pydicom_concepts
from pydicom.sr.coding import Code

from dicom_node.ai_tasks.registry import installed_tasks
from dicom_node.outputs import codes
from tests.validators import pixelmed_context_groups

CONFORMANCE = Path(__file__).parents[1] / "docs" / "conformance.md"


def concepts_of_codes_module() -> list[tuple[str, CodedConcept | Code]]:
    """Every coded concept in :mod:`dicom_node.outputs.codes` and in the module of each installed task, by where
    it is named."""
    found = []
    modules = {"": codes} | {f"{task.__module__}.": sys.modules[task.__module__] for task in installed_tasks().values()}
    for prefix, module in modules.items():
        found += [(prefix + name, concept) for name, concept in _concepts_of(module)]
    return found


def _concepts_of(module: ModuleType) -> list[tuple[str, CodedConcept | Code]]:
    found = []
    for name, value in vars(module).items():
        if isinstance(value, (CodedConcept, Code)):
            found.append((name, value))
        elif isinstance(value, dict):
            found += [
                (f"{name}[{key!r}]", item) for key, item in value.items() if isinstance(item, (CodedConcept, Code))
            ]
    return found


# SNOMED CT's semantic tag, which pydicom's dictionary keeps in some meanings: "Source (attribute)"
_SEMANTIC_TAG = re.compile(r" \((attribute|body structure|qualifier value|finding|disorder|procedure)\)$")


@cache
def known_meanings() -> dict[tuple[str, str], set[str]]:
    """(scheme, code value) -> the meanings pydicom's dictionary and PixelMed's context groups give it, in lower
    case and without a SNOMED CT semantic tag."""
    rows = [
        (scheme, value, meaning)
        for scheme, by_keyword in pydicom_concepts.items()
        for by_value in by_keyword.values()
        for value, (meaning, _cids) in by_value.items()
    ]
    rows += [row for group in pixelmed_context_groups().values() for row in group]
    meanings: dict[tuple[str, str], set[str]] = {}
    for scheme, value, meaning in rows:
        meanings.setdefault((scheme, value), set()).add(_SEMANTIC_TAG.sub("", meaning.lower()))
    return meanings


STANDARD = [(name, c) for name, c in concepts_of_codes_module() if c.scheme_designator != codes.PRIVATE_SCHEME]
PRIVATE = [(name, c) for name, c in concepts_of_codes_module() if c.scheme_designator == codes.PRIVATE_SCHEME]


@pytest.mark.parametrize(("name", "concept"), STANDARD, ids=[name for name, _ in STANDARD])
def test_a_standard_code_is_in_a_dictionary_with_its_meaning(name: str, concept: CodedConcept) -> None:
    meanings = known_meanings().get((concept.scheme_designator, concept.value))
    assert meanings, f"{name}: ({concept.value}, {concept.scheme_designator}) is in no dictionary here"
    assert concept.meaning.lower() in meanings, f"{name}: {concept.meaning!r} is not one of {sorted(meanings)}"


@pytest.mark.parametrize(("name", "concept"), PRIVATE, ids=[name for name, _ in PRIVATE])
def test_a_private_code_is_listed_in_the_conformance_statement(name: str, concept: CodedConcept) -> None:
    row = re.search(
        rf"^\| {re.escape(concept.value)} \| {re.escape(concept.meaning)} \|.+\|$", CONFORMANCE.read_text(), re.M
    )
    assert row, f"{name}: docs/conformance.md lists no row '| {concept.value} | {concept.meaning} | ... |'"
