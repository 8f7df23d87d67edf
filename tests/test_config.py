"""Configuration: defaults, the file, environment overrides, and one clear line for a bad value."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.ai_tasks.registry import default_tasks, node_tasks, task_type
from dicom_node.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DICOM_NODE_"):
            monkeypatch.delenv(name)


def test_defaults_are_those_of_the_design() -> None:
    settings = load_settings(None)
    assert settings.dicom.ae_title == "AINODE"
    assert settings.dicom.port == 11112
    assert settings.dicom.allowed_calling_aets == []
    assert settings.web.port == 8000
    assert settings.storage.root == Path("storage")
    assert settings.database.url == "sqlite:///storage/index.sqlite3"


def test_config_yaml_sets_every_key_and_documents_it() -> None:
    text = CONFIG.read_text()
    from_file = yaml.safe_load(text)
    for section, field in Settings.model_fields.items():
        if not hasattr(field.annotation, "model_fields"):  # a list, such as destinations
            lines = text.splitlines()
            assert lines[next(i for i, line in enumerate(lines) if line.startswith(f"{section}:")) - 1].startswith("#")
            continue
        assert set(from_file[section]) == set(field.annotation.model_fields), f"section {section}"
        for key in field.annotation.model_fields:
            line_number = next(i for i, line in enumerate(text.splitlines()) if line.strip().startswith(f"{key}:"))
            assert text.splitlines()[line_number - 1].strip().startswith("#"), f"{section}.{key} has no comment"
    shipped, defaults = load_settings(CONFIG), load_settings(None)
    # the shipped file adds the anatomy check to the default tasks (registry.default_tasks says why)
    tasks = {name: section for name, section in shipped.inference.tasks.items() if name != "anatomy"}
    ungated = shipped.model_copy(update={"inference": shipped.inference.model_copy(update={"tasks": tasks})})
    assert ungated == defaults, "config.yaml should spell out the defaults"


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_DICOM__PORT", "11113")
    monkeypatch.setenv("DICOM_NODE_DICOM__ALLOWED_CALLING_AETS", '["ORTHANC", "MODALITY1"]')
    monkeypatch.setenv("DICOM_NODE_STORAGE__ROOT", "/srv/node")
    settings = load_settings(CONFIG)
    assert settings.dicom.port == 11113
    assert settings.dicom.allowed_calling_aets == ["ORTHANC", "MODALITY1"]
    assert settings.dicom.ae_title == "AINODE", "keys not overridden keep the file's value"
    assert settings.database.url == "sqlite:////srv/node/index.sqlite3"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("dicom:\n  port: 70000\n", "dicom.port: Input should be less than or equal to 65535 (got 70000)"),
        ("dicom:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", "dicom.ae_title: an AE title has 1 to 16 characters"),
        ("dicom:\n  prot: 104\n", "dicom.prot: unknown key"),
        ("dicom:\n  duplicate_policy: newest\n", "dicom.duplicate_policy:"),
        ("workers:\n  max_attempts: 0\n", "workers.max_attempts:"),
        ("delivery:\n  default_destination: pacs\n", "delivery.default_destination: no destination is named 'pacs'"),
        (
            "destinations: [{name: a, ae_title: A, host: h, port: 1}, {name: a, ae_title: B, host: h, port: 2}]\n",
            "destinations: the name 'a' is used twice",
        ),
        ("dicom: [1, 2\n", "line"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_invalid_file_gives_one_line_naming_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["DICOM_NODE_DICOM_PORT", "DICOM_NODE_MLFLOW__URI", "DICOM_NODE_DICOM__PROT"])
def test_environment_variable_that_names_no_setting_is_an_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(ConfigError, match=name):
        load_settings(CONFIG)


def test_invalid_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_WEB__PORT", "eighty")
    with pytest.raises(ConfigError, match="web.port"):
        load_settings(CONFIG)


def test_serve_with_a_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("dicom:\n  port: -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dicom-node: invalid configuration: dicom.port: Input should be greater than or equal to 1 (got -1)"
    ]
    assert not (tmp_path / "storage").exists(), "nothing may be created before the configuration is valid"


def test_a_database_url_that_is_not_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_DATABASE__URL", "notaurl")
    with pytest.raises(ConfigError, match="database.url: not a database URL"):
        load_settings(CONFIG)


def test_a_list_that_is_not_json_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_DICOM__ALLOWED_CALLING_AETS", "ORTHANC")
    with pytest.raises(ConfigError, match=r"DICOM_NODE_DICOM__\*: cannot parse"):
        load_settings(CONFIG)


def test_config_yaml_lists_each_of_the_nodes_tasks_with_every_setting() -> None:
    tasks = yaml.safe_load(CONFIG.read_text())["inference"]["tasks"]
    assert list(tasks) == list(node_tasks())
    for name, section in tasks.items():
        assert set(section) == set(task_type(name).settings_type.model_fields), name


def test_the_shipped_config_runs_the_anatomy_check_and_a_config_without_tasks_keeps_routing_by_tags(
    tmp_path: Path,
) -> None:
    assert load_settings(CONFIG).inference.gate == "anatomy"
    assert default_tasks() == ("bone_age", "hallux_valgus") and "anatomy" in node_tasks()
    assert load_settings(_old_config(tmp_path)).inference.gate is None


def test_the_keys_of_releases_before_task_sections_still_configure_their_task(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(
        "inference:\n  hallux_valgus_card: /models/foot.yaml\n  hallux_valgus_threshold: 0.2\n"
        "  bone_age_flag_sds: 2.5\n  bone_age_augmentations: 4\n"
    )
    tasks = load_settings(old).inference.tasks
    assert (tasks["hallux_valgus"].card, tasks["hallux_valgus"].threshold) == (Path("/models/foot.yaml"), 0.2)
    assert (tasks["bone_age"].flag_sds, tasks["bone_age"].augmentations) == (2.5, 4)
    assert tasks["bone_age"].card == Path("models/bone-age-demo.yaml"), "keys not given keep the task's default"


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("inference:\n  tasks: {fracture: {}}\n", "no task 'fracture' is installed"),
        ("inference:\n  tasks: {hallux_valgus: {threshold: 1.5}}\n", "tasks.hallux_valgus.threshold: Input should be"),
        ("inference:\n  tasks: {bone_age: {cards: x.yaml}}\n", "tasks.bone_age.cards: unknown key"),
        ("inference:\n  tasks: 5\n", "inference.tasks: Input should be a valid dictionary"),
        ("inference:\n  tasks: {anatomy: {policy: ignore}, bone_age: {}}\n", "tasks.anatomy.policy: Input should be"),
        (
            "inference:\n  tasks: {anatomy: {}, bone_age: {}}\n  undecided_tasks: [anatomy]\n",
            "undecided_tasks: 'anatomy' looks at every image first",
        ),
        ("inference:\n  tasks: {bone_age: 5}\n  bone_age_card: x.yaml\n", "inference.tasks.bone_age: Input should be"),
        (
            "inference:\n  tasks: {bone_age: {}}\n  undecided_tasks: [hallux_valgus]\n",
            "undecided_tasks: 'hallux_valgus'",
        ),
    ],
)
def test_a_bad_task_section_is_a_one_line_error(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        load_settings(path)
    assert "\n" not in str(raised.value)


def test_a_task_key_in_the_environment_adds_to_the_nodes_tasks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DICOM_NODE_INFERENCE__TASKS__HALLUX_VALGUS__THRESHOLD", "0.4")
    for path in (None, _old_config(tmp_path)):
        tasks = load_settings(path).inference.tasks
        assert list(tasks) == list(default_tasks()), "no task dropped"
        assert tasks["hallux_valgus"].threshold == 0.4


def test_a_dumped_configuration_keeps_each_tasks_own_settings() -> None:
    settings = Settings(inference={"tasks": {"bone_age": {"flag_sds": 2.5}}})
    assert Settings(**settings.model_dump()).inference.tasks["bone_age"].flag_sds == 2.5


def _old_config(directory: Path) -> Path:
    """A config.yaml of a release before task sections."""
    path = directory / "old.yaml"
    path.write_text("inference:\n  bone_age_card: models/bone-age-demo.yaml\n  runtime: torch\n")
    return path
