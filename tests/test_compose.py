"""The demo stack in docker-compose.yml and the cluster in docker-compose.cluster.yml: valid for Compose, and
consistent with the node's settings, roles and Orthanc.

No container engine runs on the development machines, so these tests check the files, not running containers:
``docker-compose config`` validates the compose file, and the node's settings are loaded from config.yaml with
the environment the compose file and the Dockerfile give the container.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from dicom_node.config import ENV_PREFIX, ConfigError, Settings, load_settings
from dicom_node.node import ROLES
from dicom_node.task_engine import all_queues
from inference.model_card import read_card

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
CLUSTER_FILE = REPO / "docker-compose.cluster.yml"
DOCKERFILE = REPO / "Dockerfile"
CONFIG_FILE = REPO / "config.yaml"
ORTHANC_CONFIG = REPO / "docker" / "orthanc.json"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def _service(name: str) -> dict[str, Any]:
    services = _compose().get("services") or {}
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment``, in either of Compose's forms (mapping or list of ``KEY=VALUE``)."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
    for key, value in environment.items():
        assert value is not None, f"{key} is passed through from the host, so the compose file does not fix it"
    return {key: str(value) for key, value in environment.items()}


def _dockerfile_environment() -> dict[str, str]:
    """The ``ENV KEY=VALUE ...`` settings of the Dockerfile: the container starts with these."""
    logical_lines = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8")).splitlines()
    environment = {}
    for line in logical_lines:
        if line.split(maxsplit=1)[:1] == ["ENV"]:
            for word in shlex.split(line, comments=True)[1:]:
                key, separator, value = word.partition("=")
                assert separator, f"Dockerfile: use ENV KEY=VALUE, not the legacy ENV KEY VALUE form: {line!r}"
                environment[key] = value
    return environment


def _node_environment() -> dict[str, str]:
    """The node container's DICOM_NODE_* environment: the Dockerfile's, overridden by the compose file's."""
    environment = _dockerfile_environment() | _environment(_service("node"))
    return {key: value for key, value in environment.items() if key.startswith(ENV_PREFIX)}


def _settings_with(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> Settings:
    """The settings the node reads from config.yaml with exactly ``environment`` as its DICOM_NODE_* variables."""
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    return load_settings(CONFIG_FILE)


def _published_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(published, target) pairs of a service's ports, from the short or the long syntax."""
    pairs = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            assert "published" in entry, f"port {entry} is not published on the host"
            pairs.append((int(entry["published"]), int(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]  # drop /tcp
        parts = spec.rsplit(":", 2)  # [host_ip:]published:target
        assert len(parts) >= 2, f"port {entry!r} is not published on the host (no HOST:CONTAINER)"
        assert "-" not in spec, f"port ranges are not expected here: {entry!r}"
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


def _volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of a service's volumes, from the short or the long syntax."""
    targets = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            targets[entry["target"]] = entry.get("source", "")
        else:
            source, _, rest = str(entry).partition(":")
            targets[rest.split(":", 1)[0]] = source
    return targets


def _json_without_comments(text: str) -> Any:
    """Orthanc's configuration is JSON with C/C++ comments; drop them (outside strings) and parse."""
    pattern = re.compile(r'("(?:\\.|[^"\\])*")|/\*.*?\*/|//[^\n]*', re.DOTALL)
    return json.loads(pattern.sub(lambda match: match.group(1) or "", text))


def _modality_fields(entry: Any) -> tuple[str, str, int]:
    """(AET, host, port) of a DicomModalities entry: ``[aet, host, port]`` or ``{"AET":, "Host":, "Port":}``."""
    if isinstance(entry, dict):
        return entry["AET"], entry["Host"], int(entry["Port"])
    aet, host, port = entry[:3]
    return aet, host, int(port)


# --- docker-compose itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compose_file", "services"),
    [
        (COMPOSE_FILE, {"node", "orthanc", "mlflow"}),
        (
            CLUSTER_FILE,
            {"postgres", "migrate", "ingest-a", "ingest-b", "worker", "outputs", "web", "orthanc", "mlflow"},
        ),
    ],
)
def test_docker_compose_accepts_the_file(compose_file: Path, services: set[str]) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "the docker-compose binary is not installed (`make test` installs it: scripts/install-system-packages.sh)"
        )
    result = subprocess.run(
        [binary, "-f", str(compose_file), "config"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) >= services


def test_the_stack_has_the_node_orthanc_and_mlflow() -> None:
    services = _compose().get("services") or {}
    assert {"node", "orthanc", "mlflow"} <= set(services), f"services: {sorted(services)}"
    assert "build" in services["node"], "the node is built from the repository's Dockerfile"
    assert str(services["orthanc"]["image"]).split(":")[0] in {"orthancteam/orthanc", "jodogne/orthanc"}
    assert str(services["mlflow"]["image"]).split(":")[0] == "ghcr.io/mlflow/mlflow"


# --- the node's environment and settings ---------------------------------------------------------------------


def test_every_dicom_node_variable_of_the_container_is_a_known_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = _node_environment()
    assert "DICOM_NODE_DICOM__PORT" in _environment(_service("node")), "the compose file should fix the DICOM port"
    destinations = {key: value for key, value in environment.items() if key == "DICOM_NODE_DESTINATIONS"}
    for key, value in environment.items():
        try:
            _settings_with(monkeypatch, destinations | {key: value})  # with the destinations a key may name
        except ConfigError as error:
            pytest.fail(f"{key}={value!r} is not accepted by the node: {error}")
    _settings_with(monkeypatch, environment)  # and all of them together


def test_the_node_publishes_the_ports_it_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _service("node")
    settings = _settings_with(monkeypatch, _node_environment())
    ports = _published_ports(node)
    for name, port in (("DICOM", settings.dicom.port), ("web", settings.web.port)):
        assert (port, port) in ports, f"the node's {name} port is {port}; the compose file publishes {ports}"


def test_the_node_listens_on_every_interface_and_keeps_its_data_in_the_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener on the container's loopback cannot be reached through a published port or by Orthanc."""
    node = _service("node")
    settings = _settings_with(monkeypatch, _node_environment())
    assert settings.dicom.host in {"0.0.0.0", "::"}, f"dicom.host is {settings.dicom.host!r}"
    assert settings.web.host in {"0.0.0.0", "::"}, f"web.host is {settings.web.host!r}"
    volumes = _volume_targets(node)
    assert str(settings.storage.root) in volumes, (
        f"storage.root {settings.storage.root} is not a volume of the node (volumes: {volumes})"
    )
    assert not volumes[str(settings.storage.root)].startswith((".", "/")), "the node's data is a named volume"
    assert volumes[str(settings.storage.root)] in (_compose().get("volumes") or {})


# --- Orthanc knows the node ----------------------------------------------------------------------------------


def test_orthanc_is_configured_with_the_committed_file() -> None:
    volumes = _volume_targets(_service("orthanc"))
    mounted = {target: source for target, source in volumes.items() if target.startswith("/etc/orthanc/")}
    assert mounted, f"docker/orthanc.json is not mounted into /etc/orthanc/ (volumes: {volumes})"
    assert [(REPO / source).resolve() for source in mounted.values()] == [ORTHANC_CONFIG.resolve()]


def test_orthanc_knows_the_node_as_a_modality(monkeypatch: pytest.MonkeyPatch) -> None:
    orthanc = _json_without_comments(ORTHANC_CONFIG.read_text(encoding="utf-8"))
    settings = _settings_with(monkeypatch, _node_environment())
    modalities = {name: _modality_fields(entry) for name, entry in (orthanc.get("DicomModalities") or {}).items()}
    on_node = {name: fields for name, fields in modalities.items() if fields[1] == "node"}
    assert len(on_node) == 1, f"expected one modality on host 'node' (the compose service); got {modalities}"
    [(aet, _, port)] = on_node.values()
    assert aet == settings.dicom.ae_title, f"Orthanc calls {aet!r}, the node answers to {settings.dicom.ae_title!r}"
    assert port == settings.dicom.port, f"Orthanc calls port {port}, the node listens on {settings.dicom.port}"
    assert orthanc.get("DicomAet") == "ORTHANC"
    allowed = settings.dicom.allowed_calling_aets
    assert not allowed or orthanc["DicomAet"] in allowed, f"the node accepts only {allowed}, Orthanc calls as ORTHANC"
    assert orthanc.get("RemoteAccessAllowed") is True and orthanc.get("AuthenticationEnabled") is False


def test_the_node_sends_its_results_to_orthanc(monkeypatch: pytest.MonkeyPatch) -> None:
    orthanc = _json_without_comments(ORTHANC_CONFIG.read_text(encoding="utf-8"))
    settings = _settings_with(monkeypatch, _node_environment())
    [pacs] = [d for d in settings.destinations if d.name == settings.delivery.default_destination]
    assert (pacs.ae_title, pacs.host, pacs.port) == (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])


# --- the image -----------------------------------------------------------------------------------------------


def test_the_image_holds_the_model_cards_and_weights_config_yaml_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without them the container stops at start with a missing model card."""
    instructions = [line.split() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    [workdir] = [Path(words[1]) for words in instructions if words[0] == "WORKDIR"]
    copies = {Path(words[2]): REPO / words[1] for words in instructions if words[0] == "COPY"}
    settings = _settings_with(monkeypatch, _dockerfile_environment())
    for card in (settings.inference.hallux_valgus_card, settings.inference.bone_age_card):
        in_image = workdir / card
        sources = [
            source / in_image.relative_to(target)
            for target, source in copies.items()
            if in_image.is_relative_to(target)
        ]
        assert sources and sources[0].is_file(), f"{in_image} is not copied into the image"
        weights = sources[0].parent / str(read_card(sources[0]).weights.path)
        assert weights.is_file(), f"the weights of {card} are not in the repository's copy"


# --- the cluster ---------------------------------------------------------------------------------------------


def _cluster_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(CLUSTER_FILE.read_text(encoding="utf-8"))["services"]


def _node_processes() -> dict[str, list[str]]:
    """The cluster's services that run the node's image, with their ``dicom-node`` arguments."""
    return {name: service["command"] for name, service in _cluster_services().items() if service.get("build") == "."}


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_the_cluster_runs_every_role_and_serves_every_queue() -> None:
    processes = _node_processes()
    roles = sorted(_option(command, "--role") or command[0] for command in processes.values())
    assert roles == ["db", "ingest", "ingest", "web", "worker", "worker"]
    served = {queue for command in processes.values() for queue in (_option(command, "--queues") or "").split(",")}
    assert set(all_queues()) <= served, f"queues no worker takes: {set(all_queues()) - served}"
    for name, command in processes.items():
        assert command[-2:] == ["--config", "/app/config.yaml"], name
        if command[0] == "serve":
            assert _option(command, "--role") in ROLES, name
    assert _cluster_services()["worker"]["deploy"]["replicas"] >= 2, "inference scales by replicas"


def test_the_schema_is_upgraded_once_before_any_node_process_starts() -> None:
    services = _cluster_services()
    assert services["migrate"]["command"][:2] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in set(_node_processes()) - {"migrate"}:
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}, name


def test_every_node_process_uses_the_postgresql_service_and_one_storage_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _cluster_services()
    for name in _node_processes():
        environment = _dockerfile_environment() | _environment(services[name])
        settings = _settings_with(monkeypatch, {k: v for k, v in environment.items() if k.startswith(ENV_PREFIX)})
        url = make_url(settings.database.url)
        assert (url.get_backend_name(), url.host) == ("postgresql", "postgres"), name
        postgres = _environment(services["postgres"])
        assert (url.username, url.password, url.database) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
        )
        assert _volume_targets(services[name]) == {str(settings.storage.root): "node-data"}, name
