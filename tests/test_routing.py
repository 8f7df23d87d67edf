"""Routing: which tasks run on an instance, from its header."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage

from dicom_node.config import ConfigError, InferenceSettings, RoutingRule, load_settings
from dicom_node.routing import route


def header(sop_class=DigitalXRayImageStorageForPresentation, pixels: bool = True, **attributes: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    if pixels:
        ds.PixelData = b"\0\0"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("attributes", "tasks"),
    [
        ({"BodyPartExamined": "FOOT"}, ("hallux_valgus",)),
        ({"BodyPartExamined": "HAND"}, ("bone_age",)),
        ({"BodyPartExamined": "", "SeriesDescription": "Left hand PA"}, ("bone_age",)),
        ({"StudyDescription": "XR BONE AGE"}, ("bone_age",)),
        ({"ProtocolName": "Foot DP weight bearing"}, ("hallux_valgus",)),
        ({"BodyPartExamined": "CHEST"}, ("bone_age", "hallux_valgus")),  # undecided: both, as configured
        ({}, ("bone_age", "hallux_valgus")),
        ({"SeriesDescription": "FOOTBALL INJURY KNEE"}, ("bone_age", "hallux_valgus")),  # words, not substrings
    ],
)
def test_the_first_matching_rule_decides_else_the_undecided_tasks_run(attributes: dict, tasks: tuple) -> None:
    assert route(header(**attributes), InferenceSettings()).tasks == tasks


def test_rules_and_the_undecided_default_are_configurable() -> None:
    settings = InferenceSettings(
        rules=[RoutingRule(pattern="^EXTREMITY$", attributes=["BodyPartExamined"], tasks=["hallux_valgus"])],
        undecided_tasks=[],
    )
    assert route(header(BodyPartExamined="extremity"), settings).tasks == ("hallux_valgus",)
    assert route(header(SeriesDescription="EXTREMITY"), settings).tasks == ()  # attribute not in the rule
    assert route(header(BodyPartExamined="HAND"), settings).reason == "no rule matched"


def test_objects_without_pixels_and_derived_images_are_skipped_with_a_reason() -> None:
    report = route(header(BasicTextSRStorage, pixels=False, BodyPartExamined="FOOT"), InferenceSettings())
    assert report.tasks == () and report.reason == "skipped: no image (Basic Text SR Storage)"
    ours = header(SecondaryCaptureImageStorage, ImageType=["DERIVED", "SECONDARY"], BodyPartExamined="FOOT")
    derived = route(ours, InferenceSettings())
    assert derived.tasks == () and derived.reason.startswith("skipped: derived image (ImageType DERIVED\\SECONDARY")
    assert route(ours, InferenceSettings(skip_derived=False)).tasks == ("hallux_valgus",)
    single = header(ImageType="DERIVED", BodyPartExamined="FOOT")  # one value: pydicom gives a str
    assert route(single, InferenceSettings()).reason.startswith("skipped: derived image (ImageType DERIVED,")


def test_a_bad_pattern_is_a_one_line_configuration_error(tmp_path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("inference:\n  rules: [{pattern: '(FOOT', tasks: [hallux_valgus]}]\n")
    with pytest.raises(ConfigError, match=r"inference\.rules\.pattern: not a regular expression"):
        load_settings(config)
    config.write_text("inference:\n  rules: [{pattern: 'FOOT', tasks: [chest]}]\n")
    with pytest.raises(ConfigError, match=r"inference\.rules\.tasks"):
        load_settings(config)
