"""Routing: which tasks run on an instance, from its header, then from what a gate sees in the image."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage

from dicom_node.ai_tasks.interface import GateValues
from dicom_node.config import ConfigError, InferenceSettings, RoutingRule, load_settings
from dicom_node.routing import follow_the_image, route


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


# --- a gate that looks at the image first ----------------------------------------------------------------------


def gated(**anatomy: object) -> InferenceSettings:
    """The node's tasks with the anatomy check, as the shipped config.yaml runs them."""
    return InferenceSettings(tasks={"anatomy": anatomy, "bone_age": {}, "hallux_valgus": {}})


def seen(what: str, confidence: float = 0.99) -> GateValues:
    body_parts = {"hand": "HAND", "foot": "FOOT", "other": None}
    return GateValues(seen=what, body_part=body_parts[what], confidence=confidence, probabilities={what: confidence})


def followed(settings: InferenceSettings, ds: Dataset, what: str, confidence: float = 0.99, **more_tasks: object):
    """What the node runs on ``ds`` when the gate sees ``what``; ``more_tasks``: tasks of other body parts."""
    tasks = settings.configured_tasks() | more_tasks
    return follow_the_image(
        route(ds, settings), seen(what, confidence), tasks[settings.gate], tasks, settings.undecided_tasks
    )


@pytest.mark.parametrize(
    ("what", "tasks", "reason"),
    [
        ("hand", ("bone_age",), "no rule matched; the image shows a hand (99%)"),
        ("foot", ("hallux_valgus",), "no rule matched; the image shows a foot (99%)"),
        ("other", (), "no rule matched; the image shows no body part a task reads (99%)"),
    ],
)
def test_an_untagged_image_goes_to_the_tasks_of_what_it_shows(what: str, tasks: tuple, reason: str) -> None:
    settings = gated()
    assert settings.gate == "anatomy" and "anatomy" not in settings.undecided_tasks
    new_route, values = followed(settings, header(), what)
    assert (new_route.tasks, new_route.reason) == (tasks, reason)
    assert values.tagged_tasks is None and values.tasks_run == list(tasks) and not values.disagreement


def test_tags_the_image_agrees_with_are_followed_and_recorded() -> None:
    settings = gated()
    new_route, values = followed(settings, header(BodyPartExamined="HAND"), "hand")
    assert new_route == route(header(BodyPartExamined="HAND"), settings)
    assert (values.tagged_tasks, values.tasks_run, values.disagreement, values.followed) == (
        ["bone_age"],
        ["bone_age"],
        False,
        None,
    )


def test_a_confident_disagreement_follows_the_image_by_default_and_the_tags_when_configured() -> None:
    foot_tagged_hand = header(BodyPartExamined="HAND")
    by_image, values = followed(gated(), foot_tagged_hand, "foot")
    assert by_image.tasks == ("hallux_valgus",)
    assert by_image.reason == "rule 1 matched BodyPartExamined, but the image shows a foot (99%): followed the image"
    assert (values.tagged_tasks, values.tasks_run, values.disagreement, values.followed) == (
        ["bone_age"],
        ["hallux_valgus"],
        True,
        "image",
    )
    trusting_tags = gated(policy="trust_tags")
    by_tags, values = followed(trusting_tags, foot_tagged_hand, "foot")
    assert by_tags.tasks == ("bone_age",) and by_tags.reason.endswith("followed the tags")
    assert (values.tasks_run, values.disagreement, values.followed) == (["bone_age"], True, "tags")
    nothing, values = followed(gated(), foot_tagged_hand, "other")
    assert nothing.tasks == () and values.disagreement and values.followed == "image"


def test_an_unsure_gate_follows_the_tags_and_records_the_disagreement() -> None:
    settings = gated(min_confidence=0.95)
    new_route, values = followed(settings, header(BodyPartExamined="HAND"), "foot", confidence=0.94)
    assert new_route.tasks == ("bone_age",)
    assert new_route.reason.endswith("shows a foot (94%), below min_confidence 95%: followed the tags")
    assert (values.disagreement, values.followed) == (True, "tags")


def test_a_rule_to_both_body_parts_is_no_disagreement() -> None:
    settings = InferenceSettings(
        tasks={"anatomy": {}, "bone_age": {}, "hallux_valgus": {}},
        rules=[RoutingRule(pattern="HAND|FOOT", tasks=["bone_age", "hallux_valgus"])],
    )
    new_route, values = followed(settings, header(BodyPartExamined="FOOT"), "hand")
    assert new_route.tasks == ("bone_age", "hallux_valgus") and not values.disagreement


def test_tasks_of_body_parts_the_gate_cannot_tell_run_as_routed() -> None:
    toe = SimpleNamespace(body_part="TOE")  # a site's task: the anatomy check tells hands and feet only
    settings = gated()
    by_tags, values = followed(settings, header(BodyPartExamined="TOE"), "foot", toe=toe)
    assert by_tags.tasks == ("hallux_valgus",) and not values.disagreement, "the foot's rule matches TOE"
    with_toe = settings.model_copy(
        update={
            "rules": [RoutingRule(pattern="TOE", tasks=["bone_age"])],
            "undecided_tasks": ["bone_age", "hallux_valgus", "toe"],
        }
    )
    assert followed(with_toe, header(), "foot", toe=toe)[0].tasks == ("hallux_valgus", "toe")
    assert followed(with_toe, header(), "other", toe=toe)[0].tasks == ("toe",)
    toe_tagged_as_hand = followed(with_toe, header(BodyPartExamined="TOE"), "foot", toe=toe)
    assert toe_tagged_as_hand[0].tasks == ("hallux_valgus",) and toe_tagged_as_hand[1].followed == "image"


def test_a_gated_image_waits_in_the_queue_of_every_task_and_a_skipped_one_in_none() -> None:
    settings = gated()
    assert route(header(BodyPartExamined="HAND"), settings).models(settings) == ("anatomy", "bone_age", "hallux_valgus")
    assert route(header(BasicTextSRStorage, pixels=False), settings).models(settings) == ()
    ungated = InferenceSettings()
    assert route(header(BodyPartExamined="HAND"), ungated).models(ungated) == ("bone_age",)


def test_no_rule_routes_to_a_gate(tmp_path) -> None:
    with pytest.raises(ValueError, match="undecided_tasks: 'anatomy' looks at every image first"):
        InferenceSettings(tasks={"anatomy": {}, "bone_age": {}}, undecided_tasks=["anatomy"])
    with pytest.raises(ValueError, match="rules.tasks: 'anatomy' looks at every image first"):
        InferenceSettings(tasks={"anatomy": {}}, rules=[RoutingRule(pattern="HAND", tasks=["anatomy"])])


def test_an_upload_cannot_ask_for_the_gate_as_its_task() -> None:
    from web.uploads import UploadRefused, prepare

    with pytest.raises(UploadRefused, match="no task 'anatomy' runs here .*; anatomy looks at every image first"):
        prepare(b"not read", gated(), 2**20, None, None, "anatomy")
