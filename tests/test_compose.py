"""The demo stack (docker-compose.yml) and the cluster (docker-compose.cluster.yml), each with its two ways of
networking (Compose's network with published ports, or the host network): valid for Compose, and consistent with
the node's settings, roles, Orthanc's configuration and the images ``make containers`` builds.

These check the files in seconds; tests/test_containers.py builds the images and runs the stacks. The node's
settings are loaded from config.yaml with the environment the Dockerfile and the compose files give a container.
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

from dicom_node.ai_tasks.registry import node_tasks
from dicom_node.config import ENV_PREFIX, ConfigError, Settings, load_settings
from dicom_node.roles import ROLES
from dicom_node.task_engine import all_queues
from inference.model_card import read_card

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
PORTS_FILE = REPO / "docker-compose.override.yml"
HOSTNET_FILE = REPO / "docker-compose.hostnet.yml"
CLUSTER_FILE = REPO / "docker-compose.cluster.yml"
CLUSTER_PORTS_FILE = REPO / "docker-compose.cluster.ports.yml"
CLUSTER_HOSTNET_FILE = REPO / "docker-compose.cluster.hostnet.yml"
DOCKERFILE = REPO / "Dockerfile"
CONFIG_FILE = REPO / "config.yaml"
ORTHANC_CONFIG = REPO / "docker" / "orthanc" / "orthanc.json"
ORTHANC_HOSTNET_CONFIG = REPO / "docker" / "orthanc" / "orthanc.hostnet.json"
BUILD_SCRIPT = REPO / "scripts" / "build-containers.sh"
# each stack, as started on Compose's network and on the host network
STACKS = {
    "demo": (COMPOSE_FILE, PORTS_FILE),
    "demo on the host network": (COMPOSE_FILE, HOSTNET_FILE),
    "cluster": (CLUSTER_FILE, CLUSTER_PORTS_FILE),
    "cluster on the host network": (CLUSTER_FILE, CLUSTER_HOSTNET_FILE),
}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge of an override file, as far as these files need it: mappings merged key by key (services,
    environment), lists such as ports and volumes joined, a command or anything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merged(base[key], value)
        elif isinstance(value, list) and isinstance(base.get(key), list) and key not in ("command", "entrypoint"):
            merged[key] = base[key] + value
        else:
            merged[key] = value
    return merged


def _services(*files: Path) -> dict[str, dict[str, Any]]:
    """The services of ``files``, each later file merged over the ones before."""
    merged: dict[str, Any] = {}
    for path in files:
        merged = _merged(merged, _load(path))
    return merged.get("services") or {}


def _compose() -> dict[str, Any]:
    return _load(COMPOSE_FILE)


def _service(name: str, *overrides: Path) -> dict[str, Any]:
    services = _services(COMPOSE_FILE, *overrides)
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


def _final_stage() -> list[str]:
    """The logical lines of the Dockerfile's last stage, the image that runs (continuations joined)."""
    lines = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8")).splitlines()
    starts = [number for number, line in enumerate(lines) if line.split(maxsplit=1)[:1] == ["FROM"]]
    return lines[starts[-1] :]


def _dockerfile_environment() -> dict[str, str]:
    """The ``ENV KEY=VALUE ...`` settings of the image: the container starts with these."""
    environment = {}
    for line in _final_stage():
        if line.split(maxsplit=1)[:1] == ["ENV"]:
            for word in shlex.split(line, comments=True)[1:]:
                key, separator, value = word.partition("=")
                assert separator, f"Dockerfile: use ENV KEY=VALUE, not the legacy ENV KEY VALUE form: {line!r}"
                environment[key] = value
    return environment


def _node_environment(*overrides: Path) -> dict[str, str]:
    """The node container's DICOM_NODE_* environment: the Dockerfile's, overridden by the compose files'."""
    environment = _dockerfile_environment() | _environment(_service("node", *overrides))
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


def _compose_command(program: str) -> list[str] | None:
    """How to run Debian's docker-compose (1.29) or the Compose v2 plugin here; None where it is not installed."""
    if program == "docker-compose":
        binary = shutil.which("docker-compose")
        return [binary] if binary else None
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        return None
    return [docker, "compose"]


@pytest.mark.parametrize("program", ["docker-compose", "docker compose"])
@pytest.mark.parametrize("stack", STACKS)
def test_compose_accepts_the_files(stack: str, program: str) -> None:
    command = _compose_command(program)
    if command is None:
        pytest.skip(f"{program} is not installed (`make test` installs docker-compose 1.29; Debian has no v2 plugin)")
    files = [argument for path in STACKS[stack] for argument in ("-f", str(path))]
    result = subprocess.run([*command, *files, "config"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{program} config failed:\n{result.stderr}"
    assert set(yaml.safe_load(result.stdout)["services"]) == set(_services(*STACKS[stack]))


def _built_images() -> dict[str, tuple[Path, Path]]:
    """The images scripts/build-containers.sh builds: {tag: (Dockerfile, context)}, from its ``build`` lines."""
    images = {}
    for name, dockerfile, context in re.findall(r"^build (\S+) (\S+) (\S+)", BUILD_SCRIPT.read_text(), re.MULTILINE):
        images["dicom-node:local" if name == "node" else f"dicom-node-{name}:local"] = (
            REPO / dockerfile,
            REPO / context,
        )
    return images


@pytest.mark.parametrize("stack", STACKS)
def test_every_service_runs_an_image_make_containers_builds(stack: str) -> None:
    """No image is pulled: a registry may be out of reach (it is on the development machines)."""
    built = _built_images()
    for name, service in _services(*STACKS[stack]).items():
        assert service.get("image") in built, f"{name}: {service.get('image')} is not built by `make containers`"
        dockerfile, context = built[service["image"]]
        build = service["build"]
        assert (REPO / build).resolve() == context.resolve(), f"{name} builds {build}, the script {context}"
        assert dockerfile.resolve() == (context / "Dockerfile").resolve(), name


def test_the_stack_has_the_node_orthanc_and_mlflow() -> None:
    services = _compose().get("services") or {}
    assert set(services) == {"node", "orthanc", "mlflow"}, f"services: {sorted(services)}"
    node = services["node"]
    assert node["environment"]["DICOM_NODE_MLFLOW__TRACKING_URI"] == "http://mlflow:5000", "runs go to the server"
    assert set(node["depends_on"]) == {"orthanc", "mlflow"}


@pytest.mark.parametrize("stack", ["demo on the host network", "cluster on the host network"])
def test_on_the_host_network_every_service_listens_on_loopback_on_ports_of_its_own(
    stack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = _services(*STACKS[stack])
    listening: dict[int, str] = {}

    def listens(port: int, who: str) -> None:
        assert port not in listening, f"{who} and {listening[port]} both listen on {port}"
        listening[port] = who

    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert "ports" not in service and "networks" not in service, f"{name}: ports and networks are a bridge's"
        if name == "postgres":
            listens(int(_environment(service)["PGPORT"]), name)
            assert "listen_addresses=127.0.0.1" in service["command"]
        elif name == "mlflow":
            command = service["command"]
            assert _option(command, "--host") == "127.0.0.1"
            listens(int(_option(command, "--port")), name)
        elif name == "orthanc":
            orthanc = _json_without_comments(ORTHANC_HOSTNET_CONFIG.read_text(encoding="utf-8"))
            assert orthanc["RemoteAccessAllowed"] is False, "Orthanc's REST API answers loopback only"
            # its DICOM port listens on every interface: it takes objects from the node on this host alone
            assert (orthanc["DicomAlwaysAllowStore"], orthanc["DicomCheckModalityHost"]) == (False, True)
            listens(orthanc["DicomPort"], f"{name} DICOM")
            listens(orthanc["HttpPort"], f"{name} HTTP")
        elif name != "migrate":
            settings = _settings_with(monkeypatch, _container_environment(service))
            assert (settings.web.host, settings.dicom.host) == ("127.0.0.1", "127.0.0.1"), name
            listens(settings.web.port, f"{name} web")
            if _role(service) in ("all", "ingest"):
                listens(settings.dicom.port, f"{name} DICOM")


# --- the node's environment and settings ---------------------------------------------------------------------


def _container_environment(service: dict[str, Any]) -> dict[str, str]:
    """A node container's DICOM_NODE_* environment: the image's, overridden by the service's."""
    environment = _dockerfile_environment() | _environment(service)
    return {key: value for key, value in environment.items() if key.startswith(ENV_PREFIX)}


def _role(service: dict[str, Any]) -> str:
    command = service.get("command") or ["serve"]
    return _option(command, "--role") or ("all" if command[0] == "serve" else command[0])


def test_every_dicom_node_variable_of_the_container_is_a_known_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = _node_environment()
    assert "DICOM_NODE_DICOM__PORT" in _environment(_service("node")), "the compose file should fix the DICOM port"
    destinations = {key: value for key, value in environment.items() if key == "DICOM_NODE_DESTINATIONS"}
    for key, value in environment.items():
        try:
            _settings_with(monkeypatch, destinations | {key: value})  # with the destinations a key may name
        except ConfigError as error:
            pytest.fail(f"{key}={value!r} is not accepted by the node: {error}")
    for stack in STACKS.values():
        for service in _services(*stack).values():
            if "dicom-node" in str(service.get("image")):
                _settings_with(monkeypatch, _container_environment(service))  # all of them together


def test_the_node_publishes_the_ports_it_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    node = _service("node", PORTS_FILE)
    settings = _settings_with(monkeypatch, _node_environment(PORTS_FILE))
    ports = _published_ports(node)
    for name, port in (("DICOM", settings.dicom.port), ("web", settings.web.port)):
        assert (port, port) in ports, f"the node's {name} port is {port}; the compose file publishes {ports}"
    for name, service in _services(*STACKS["demo"]).items():
        for published in _published_ports(service):
            assert any(f"127.0.0.1:{published[0]}:" in str(entry) for entry in service["ports"]), (
                f"{name} publishes {published[0]} beyond the host's loopback"
            )


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


def test_orthanc_is_configured_with_the_committed_files() -> None:
    """The image carries orthanc.json; on the host network the override mounts orthanc.hostnet.json over it."""
    dockerfile = (ORTHANC_CONFIG.parent / "Dockerfile").read_text(encoding="utf-8").splitlines()
    assert "COPY orthanc.json /etc/orthanc/orthanc.json" in dockerfile
    assert 'CMD ["Orthanc", "/etc/orthanc/orthanc.json"]' in dockerfile
    for files in (STACKS["demo on the host network"], STACKS["cluster on the host network"]):
        volumes = _volume_targets(_services(*files)["orthanc"])
        assert (REPO / volumes["/etc/orthanc/orthanc.json"]).resolve() == ORTHANC_HOSTNET_CONFIG.resolve()


@pytest.mark.parametrize(
    ("stack", "orthanc_config", "node_service", "node_host"),
    [
        ("demo", ORTHANC_CONFIG, "node", "node"),
        ("demo on the host network", ORTHANC_HOSTNET_CONFIG, "node", "127.0.0.1"),
        ("cluster", ORTHANC_CONFIG, "ingest-a", "node"),
        ("cluster on the host network", ORTHANC_HOSTNET_CONFIG, "ingest-a", "127.0.0.1"),
    ],
)
def test_orthanc_and_the_node_know_each_other(
    stack: str, orthanc_config: Path, node_service: str, node_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    orthanc = _json_without_comments(orthanc_config.read_text(encoding="utf-8"))
    services = _services(*STACKS[stack])
    settings = _settings_with(monkeypatch, _container_environment(services[node_service]))
    modalities = {name: _modality_fields(entry) for name, entry in (orthanc.get("DicomModalities") or {}).items()}
    assert list(modalities) == ["ainode"], modalities
    aet, host, port = modalities["ainode"]
    assert (aet, host, port) == (settings.dicom.ae_title, node_host, settings.dicom.port)
    if node_host != "127.0.0.1":
        aliases = (services[node_service].get("networks") or {}).get("default", {}).get("aliases", [])
        assert node_host in [node_service, *aliases], f"Orthanc calls {node_host!r}, not a name of {node_service}"
    assert orthanc.get("DicomAet") == "ORTHANC"
    allowed = settings.dicom.allowed_calling_aets
    assert not allowed or orthanc["DicomAet"] in allowed, f"the node accepts only {allowed}, Orthanc calls as ORTHANC"
    assert orthanc.get("AuthenticationEnabled") is False
    orthanc_host = "127.0.0.1" if node_host == "127.0.0.1" else "orthanc"
    for name, service in services.items():
        if "dicom-node:" not in str(service.get("image")) or name == "migrate":
            continue
        service_settings = _settings_with(monkeypatch, _container_environment(service))
        [pacs] = [d for d in service_settings.destinations if d.name == service_settings.delivery.default_destination]
        assert (pacs.ae_title, pacs.host, pacs.port) == (orthanc["DicomAet"], orthanc_host, orthanc["DicomPort"]), name


# --- the image -----------------------------------------------------------------------------------------------


def test_the_image_holds_the_model_cards_and_weights_config_yaml_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without them the container stops at start with a missing model card."""
    instructions = [line.split() for line in _final_stage() if line.strip()]
    [workdir] = [Path(words[1]) for words in instructions if words[0] == "WORKDIR"]
    copies = {
        Path(words[2]): REPO / words[1]
        for words in instructions
        if words[0] == "COPY" and not words[1].startswith("--")
    }
    settings = _settings_with(monkeypatch, _dockerfile_environment())
    for card in (task.card for task in settings.inference.tasks.values()):
        in_image = workdir / card
        sources = [
            source / in_image.relative_to(target)
            for target, source in copies.items()
            if in_image.is_relative_to(target)
        ]
        assert sources and sources[0].is_file(), f"{in_image} is not copied into the image"
        weights = sources[0].parent / str(read_card(sources[0]).weights.path)
        assert weights.is_file(), f"the weights of {card} are not in the repository's copy"


def test_the_image_runs_as_a_user_of_its_own_with_a_health_check() -> None:
    instructions = {line.split(maxsplit=1)[0]: line for line in _final_stage() if line.strip()}
    assert instructions["USER"].split()[1].split(":")[0] not in {"0", "root"}
    assert '"python", "-m", "dicom_node.probe"' in instructions["HEALTHCHECK"]


# --- the cluster ---------------------------------------------------------------------------------------------


def _cluster_services() -> dict[str, dict[str, Any]]:
    return _load(CLUSTER_FILE)["services"]


def _node_processes() -> dict[str, list[str]]:
    """The cluster's services that run the node's image, with their ``dicom-node`` arguments."""
    return {name: service["command"] for name, service in _cluster_services().items() if service.get("build") == "."}


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_the_cluster_runs_every_role_and_serves_every_queue() -> None:
    processes = _node_processes()
    roles = sorted(_option(command, "--role") or command[0] for command in processes.values())
    assert roles == ["db", "ingest", "ingest", "web", "worker", "worker", "worker"]
    served = {queue for command in processes.values() for queue in (_option(command, "--queues") or "").split(",")}
    queues = set(all_queues(node_tasks()))
    assert queues <= served, f"queues no worker takes: {queues - served}"
    for name, command in processes.items():
        assert command[-2:] == ["--config", "/app/config.yaml"], name
        if command[0] == "serve":
            assert _option(command, "--role") in ROLES, name
    inference = [command for command in processes.values() if "infer." in (_option(command, "--queues") or "")]
    assert len(inference) >= 2, "two inference workers: one may die while the other goes on"


def test_the_schema_is_upgraded_once_before_any_node_process_starts() -> None:
    services = _cluster_services()
    assert services["migrate"]["command"][:2] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in set(_node_processes()) - {"migrate"}:
        assert services[name]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}, name


@pytest.mark.parametrize("stack", ["cluster", "cluster on the host network"])
def test_every_node_process_uses_the_postgresql_service_and_one_storage_volume(
    stack: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = _services(*STACKS[stack])
    postgres = _environment(services["postgres"])
    for name in _node_processes():
        settings = _settings_with(monkeypatch, _container_environment(services[name]))
        url = make_url(settings.database.url)
        host, port = ("127.0.0.1", int(postgres["PGPORT"])) if "PGPORT" in postgres else ("postgres", 5432)
        assert (url.get_backend_name(), url.host, url.port or 5432) == ("postgresql", host, port), name
        assert (url.username, url.password, url.database) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
        )
        assert _volume_targets(services[name]) == {str(settings.storage.root): "node-data"}, name
