"""The node's configuration: one typed settings object, read from ``config.yaml`` and the environment.

Every key of ``config.yaml`` can be overridden by an environment variable named
``DICOM_NODE_<SECTION>__<KEY>``, for example ``DICOM_NODE_DICOM__PORT=11112``. Environment values win over
the file; values absent from both take the defaults below. ``config.yaml`` documents every key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    IPvAnyNetwork,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dicom_node.ai_tasks.interface import GateTask, Task, TaskSettings
from dicom_node.ai_tasks.registry import default_tasks, installed_tasks, task_type
from dicom_node.outputs.uids import check_uid_root
from inference.pixels import DEFAULT_PICTURE_SIZE

ENV_PREFIX = "DICOM_NODE_"


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line that names the offending key."""


def _check_ae_title(value: str) -> str:
    """An Application Entity title (PS3.5 section 6.2, VR AE): 1-16 characters, no backslash or control
    characters, not only spaces."""
    if not 1 <= len(value) <= 16:
        raise ValueError(f"an AE title has 1 to 16 characters, {value!r} has {len(value)}")
    if not value.strip():
        raise ValueError("an AE title cannot be only spaces")
    if re.search(r"[\\\x00-\x1f\x7f]", value):
        raise ValueError(f"an AE title cannot contain a backslash or control characters: {value!r}")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_regular_expression(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"not a regular expression: {error}") from None
    return value


RegularExpression = Annotated[str, AfterValidator(_check_regular_expression)]

UidRoot = Annotated[str, AfterValidator(check_uid_root)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    """A section of the configuration file: unknown keys are errors, so a typo does not pass silently."""

    model_config = ConfigDict(extra="forbid")


class ListenerTlsSettings(Section):
    """DICOM over TLS on the listener (PS3.15 B.1, TLS 1.2 or later): the node's certificate and key; with
    ``ca_file``, every caller must present a certificate signed by that CA."""

    cert_file: FilePath
    key_file: FilePath
    ca_file: FilePath | None = None


class DicomSettings(Section):
    ae_title: AETitle = "AINODE"
    uid_root: UidRoot | None = None
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[AETitle] = []
    calling_ae_addresses: dict[AETitle, list[IPvAnyNetwork]] = {}
    tls: ListenerTlsSettings | None = None
    max_associations: int = Field(16, ge=1)
    accept_all_storage: bool = False
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"
    max_pdu_size: int = Field(0, ge=0)
    max_inflated_mb: int = Field(256, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1)
    acse_timeout: Seconds = 30.0
    dimse_timeout: Seconds = 60.0
    network_timeout: Seconds = 60.0

    @model_validator(mode="after")
    def _bound_titles_are_allowed(self) -> DicomSettings:
        if self.allowed_calling_aets:
            unlisted = sorted(set(self.calling_ae_addresses) - set(self.allowed_calling_aets))
            if unlisted:
                raise ValueError(f"calling_ae_addresses: {unlisted} not in allowed_calling_aets")
        return self


SHARED_TOKEN_REMOVED = (
    "api_token was removed: every user signs in now; create the first with `dicom-node users add NAME --role admin` "
    "and a personal API token with `dicom-node users token NAME`"
)
SECRET_KEYS = {"web.oidc.client_secret"}  # their values never appear in error messages


class OidcSettings(Section):
    """Sign-in through the hospital's OpenID Connect provider (docs/security.md)."""

    issuer: str  # https://idp.example.org/realms/hospital; its /.well-known/openid-configuration is read
    client_id: str
    client_secret: SecretStr
    # the claim of the ID token and the access tokens that lists the user's roles: viewer, operator, admin
    roles_claim: str = "roles"
    username_claim: str = "preferred_username"
    scopes: str = "openid profile roles"
    # the API's audience in access tokens (the aud claim); empty: the client id
    audience: str = ""
    # where the provider sends the browser back; empty: this server's /login/oidc/callback as requested
    redirect_uri: str = ""

    @field_validator("issuer")
    @classmethod
    def _is_https_url(cls, value: str) -> str:
        """https, for the provider's keys come from it; plain http only to a provider on this machine."""
        match = re.match(r"^(https?)://(\[[0-9a-fA-F:]+\]|[^/:\s]+)", value)
        if match is None:
            raise ValueError(f"an issuer is an https URL, not {value!r}")
        if match[1] == "http" and match[2].strip("[]") not in ("localhost", "127.0.0.1", "::1"):
            raise ValueError(f"an issuer is an https URL (http only on loopback), not {value!r}")
        return value.rstrip("/")


class WebSettings(Section):
    host: str = "127.0.0.1"
    port: Port = 8000
    # None: local users only (dicom-node users ...)
    oidc: OidcSettings | None = None
    session_hours: float = Field(8.0, gt=0, le=24 * 30)
    # failed sign-ins per address and user name within 15 minutes before the next attempts are refused (429)
    sign_in_attempts: int = Field(5, ge=1)
    cors_origins: list[str] = []
    max_upload_mb: int = Field(16, ge=1, le=1024)

    @model_validator(mode="before")
    @classmethod
    def _no_shared_token(cls, values: object) -> object:
        if isinstance(values, dict) and "api_token" in values:
            raise ValueError(SHARED_TOKEN_REMOVED)
        return values


class AuditSyslogSettings(Section):
    """A collector of DICOM audit messages (PS3.15 A.5) over syslog TLS (RFC 5425)."""

    host: str
    port: Port = 6514
    ca_file: Path | None = None  # the collector's CA; None: the system's
    cert_file: Path | None = None  # the node's client certificate, where the collector asks for one
    key_file: Path | None = None


class AuditSettings(Section):
    # None: the trail is kept in the index only
    syslog: AuditSyslogSettings | None = None
    # AuditSourceID of the messages; empty: the node's AE title
    source_id: str = ""


class StorageSettings(Section):
    root: Path = Path("storage")
    min_free_mb: int = Field(1024, ge=0)


class DatabaseSettings(Section):
    url: str = ""
    # below the DIMSE timeout of the usual senders (Orthanc: 10 s), so that they get 0xA700, not a dropped answer
    busy_timeout: Seconds = 5.0
    # Upgrade an index behind the code's schema at start. None: on SQLite yes, on PostgreSQL no.
    auto_upgrade: bool | None = None

    @field_validator("url")
    @classmethod
    def _is_database_url(cls, value: str) -> str:
        if value:
            try:
                make_url(value)
            except ArgumentError:
                raise ValueError("not a database URL such as sqlite:///path or postgresql+psycopg://...") from None
        return value


class WorkerSettings(Section):
    count: int = Field(1, ge=0)
    poll_interval: Seconds = 0.5
    max_attempts: int = Field(3, ge=1)
    retry_backoff: Seconds = 5.0
    heartbeat_interval: Seconds = 5.0
    stalled_after: Seconds = 30.0

    @model_validator(mode="after")
    def _heartbeats_come_before_a_worker_counts_as_dead(self) -> WorkerSettings:
        if self.stalled_after < 2 * self.heartbeat_interval:
            raise ValueError("stalled_after must be at least twice heartbeat_interval, or live workers count as dead")
        return self


TaskName = str  # an installed task's name (:mod:`dicom_node.ai_tasks.registry`)
QUEUE_NAME_LENGTH = 128  # of Procrastinate's queue_name column, which names the tasks an image is routed to
RoutedAttribute = Literal["BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName"]
ROUTED_ATTRIBUTES: tuple[RoutedAttribute, ...] = (
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
)


class RoutingRule(Section):
    """Instances whose ``attributes`` match ``pattern`` (a regular expression, any case) run ``tasks``."""

    pattern: RegularExpression
    tasks: list[TaskName]
    attributes: list[RoutedAttribute] = list(ROUTED_ATTRIBUTES)


class InferenceSettings(Section):
    """The tasks the node runs and how. ``tasks``: each task's own section (its model card and settings, as the
    task declares them); when none is listed, the node's own but the gate (``registry.default_tasks``). At most one
    task is a gate, which looks at every image first (:class:`dicom_node.ai_tasks.interface.GateTask`). ``rules``
    default to one rule per task but the gate, from the pattern it declares; ``undecided_tasks`` to every task but
    the gate."""

    tasks: dict[TaskName, SerializeAsAny[TaskSettings]] = Field(default_factory=dict)
    runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    threads: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    rules: list[RoutingRule] | None = None
    undecided_tasks: list[TaskName] | None = None
    skip_derived: bool = True
    on_missing_model: Literal["refuse", "degraded"] = "refuse"

    @model_validator(mode="before")
    @classmethod
    def _tasks_by_their_own_settings(cls, data: Any) -> Any:
        """Each task's section read by the task's settings class; the keys of releases before tasks had sections
        (``<task>_card`` ...) moved into them, as each task declares (``Task.moved_settings``)."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        listed = data.get("tasks")
        if listed is not None and not isinstance(listed, Mapping):
            return data  # the field's own validation says what it must be
        tasks = dict(listed if listed is not None else {name: {} for name in default_tasks()})
        for name, task in installed_tasks().items():
            for old, new in task.moved_settings.items():
                if old not in data:
                    continue
                value = data.pop(old)
                section = tasks.get(name)
                if section is None:
                    raise ValueError(f"{old}: moved to tasks.{name}.{new}, and tasks does not list {name}")
                if isinstance(section, BaseModel):
                    section = section.model_dump()
                if isinstance(section, Mapping):  # anything else is refused below, as it is
                    tasks[name] = dict(section) | {new: value}  # the old key wins: an override in the environment
        for name, section in tasks.items():
            task = task_type(name)
            if isinstance(section, task.settings_type):
                continue
            try:
                tasks[name] = task.settings_type.model_validate(section or {})
            except ValidationError as error:
                item = error.errors()[0]
                key = "".join(f".{part}" for part in item["loc"])
                message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
                raise ValueError(f"tasks.{name}{key}: {message}") from None
        data["tasks"] = tasks
        return data

    @model_validator(mode="after")
    def _routes_name_configured_tasks(self) -> InferenceSettings:
        if not self.tasks:
            raise ValueError("tasks: list at least one task")
        every_task = "infer." + "+".join(sorted(self.tasks))  # the queue of an image for every task (PostgreSQL)
        if len(every_task) > QUEUE_NAME_LENGTH:
            raise ValueError(
                f"tasks: their names make a queue name of {len(every_task)} characters, more than the task engine's "
                f"{QUEUE_NAME_LENGTH}: shorten them"
            )
        gates = [name for name in self.tasks if issubclass(task_type(name), GateTask)]
        if len(gates) > 1:
            raise ValueError(f"tasks: {' and '.join(gates)} both look at every image first: configure one of them")
        routed = [name for name in self.tasks if name not in gates]
        if self.rules is None:
            self.rules = [RoutingRule(pattern=task_type(name).routing_pattern, tasks=[name]) for name in routed]
        if self.undecided_tasks is None:
            self.undecided_tasks = routed
        named = [("rules.tasks", name) for rule in self.rules for name in rule.tasks]
        named += [("undecided_tasks", name) for name in self.undecided_tasks]
        for key, name in named:
            if name not in self.tasks:
                raise ValueError(f"{key}: {name!r} is not among the tasks ({', '.join(self.tasks)})")
            if name in gates:
                raise ValueError(f"{key}: {name!r} looks at every image first: no rule routes to it")
        return self

    def configured_tasks(self) -> dict[TaskName, Task]:
        """The tasks, made with their settings, in the order of ``tasks``."""
        return {name: task_type(name)(settings) for name, settings in self.tasks.items()}

    @property
    def gate(self) -> TaskName | None:
        """The configured task that looks at every image first, if any."""
        return next((name for name in self.tasks if issubclass(task_type(name), GateTask)), None)


class TlsSettings(Section):
    """TLS for associations to a destination (PS3.15 B.1): the CA that signed its certificate, and ours when it
    asks for one."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


class Destination(Section):
    """A DICOM peer that receives the node's results by C-STORE."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: AETitle
    host: str
    port: Port
    tls: TlsSettings | None = None


OutputKind = Literal["secondary_capture", "parametric_map", "structured_report"]
OUTPUT_KINDS: tuple[OutputKind, ...] = ("secondary_capture", "parametric_map", "structured_report")


class DeliveryRule(Section):
    """Outputs of ``kinds`` for instances sent by a calling AE matching ``calling_ae`` (a regular expression,
    any case; empty matches every caller) go to ``destinations``."""

    calling_ae: RegularExpression = ""
    kinds: list[OutputKind] = list(OUTPUT_KINDS)
    destinations: list[str]


class OutputSettings(Section):
    secondary_captures: bool = True
    parametric_maps: bool = True
    structured_report: bool = True
    max_image_size: int = Field(DEFAULT_PICTURE_SIZE, ge=512, le=4096)


class DeliverySettings(Section):
    default_destination: str | None = None
    rules: list[DeliveryRule] = []
    max_attempts: int = Field(8, ge=1)
    retry_backoff: Seconds = 5.0
    max_backoff: Seconds = 600.0
    objects_per_association: int = Field(50, ge=1)
    associations: int = Field(2, ge=1, le=16)
    poll_interval: Seconds = 0.5
    timeout: Seconds = 30.0


class MlflowSettings(Section):
    """MLflow tracking of every inference (:mod:`dicom_node.tracking`); an empty ``tracking_uri`` is a local
    store under the storage root."""

    enabled: bool = True
    tracking_uri: str = ""
    experiment: str = Field("inference", min_length=1)
    ui_url: str = "http://127.0.0.1:5000"
    log_phi: bool = False
    batch_size: int = Field(20, ge=1)
    poll_interval: Seconds = 2.0
    retry_backoff: Seconds = 5.0
    max_backoff: Seconds = 600.0


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    """All of the node's settings; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    dicom: DicomSettings = DicomSettings()
    web: WebSettings = WebSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    workers: WorkerSettings = WorkerSettings()
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    outputs: OutputSettings = OutputSettings()
    destinations: list[Destination] = []
    delivery: DeliverySettings = DeliverySettings()
    audit: AuditSettings = AuditSettings()
    mlflow: MlflowSettings = MlflowSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _destinations_are_known(self) -> Settings:
        names = [destination.name for destination in self.destinations]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"destinations: the name {name!r} is used twice")
        named = {
            f"delivery.rules.{number}.destinations": rule.destinations
            for number, rule in enumerate(self.delivery.rules)
        }
        if self.delivery.default_destination is not None:
            named["delivery.default_destination"] = [self.delivery.default_destination]
        for key, used in named.items():
            for name in used:
                if name not in names:
                    raise ValueError(f"{key}: no destination is named {name!r} (destinations: {names})")
        return self

    @model_validator(mode="after")
    def _default_database_under_storage_root(self) -> Settings:
        if not self.database.url:
            self.database.url = f"sqlite:///{self.storage.root / 'index.sqlite3'}"
        return self

    @model_validator(mode="after")
    def _default_mlflow_store_under_storage_root(self) -> Settings:
        if not self.mlflow.tracking_uri:
            self.mlflow.tracking_uri = f"sqlite:///{self.storage.root / 'mlflow' / 'mlflow.db'}"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment must win over them.
        return (env_settings, init_settings)


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path`` (YAML; optional) and the environment into :class:`Settings`.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid. The message is one line.
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as error:
            raise ConfigError(f"cannot read configuration file {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            line = f" line {where.line + 1}" if where else ""
            raise ConfigError(f"{path}{line}: not valid YAML") from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    _with_the_default_tasks_unless_listed(file_values)
    if f"{ENV_PREFIX}WEB__API_TOKEN" in os.environ:
        raise ConfigError(f"{ENV_PREFIX}WEB__API_TOKEN: {SHARED_TOKEN_REMOVED}")
    unknown = _unknown_environment_variables(os.environ)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a setting (expected {ENV_PREFIX}<SECTION>__<KEY>)")
    try:
        return Settings(**file_values)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    except SettingsError as error:  # an environment value that is not valid JSON for a list or mapping
        section = str(error).split('"')[1] if '"' in str(error) else "?"
        raise ConfigError(
            f"{ENV_PREFIX}{section.upper()}__*: cannot parse the value (a list is JSON, e.g. '[\"ORTHANC\"]')"
        ) from None


def _with_the_default_tasks_unless_listed(file_values: dict[str, Any]) -> None:
    """A file that lists no ``inference.tasks`` runs the default tasks: they are filled in before the
    environment is laid over the file, so that a variable that sets one task's key adds to them, not replaces
    them."""
    inference = file_values.setdefault("inference", {})
    if isinstance(inference, dict) and inference.get("tasks") is None:
        inference["tasks"] = {name: {} for name in default_tasks()}


def _unknown_environment_variables(environ: Mapping[str, str]) -> list[str]:
    """``DICOM_NODE_*`` variables that name no setting; pydantic-settings would ignore them silently."""
    unknown = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        section, separator, key = name[len(ENV_PREFIX) :].lower().partition("__")
        field = Settings.model_fields.get(section)
        known = set(getattr(field.annotation, "model_fields", {})) if field is not None else set()
        if section == "inference":  # the old keys that moved into the tasks' sections
            known |= {old for task in installed_tasks().values() for old in task.moved_settings}
        key = key.partition("__")[0]  # a nested section's keys (web.oidc.issuer) are its model's to check
        if field is None or (separator and key not in known):
            unknown.append(name)
    return unknown


def _describe(error: ValidationError) -> str:
    """One line naming each invalid key, e.g. ``dicom.port: Input should be less than or equal to 65535``."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not isinstance(part, int)) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        nested = re.match(r"([a-z_][a-z0-9_.]*): ", message) if item["type"] == "value_error" else None
        if nested:  # a section's validator naming the key within it
            key, message = f"{key}.{nested[1]}", message[nested.end() :]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif isinstance(item.get("input"), str | int | float | bool) and key not in SECRET_KEYS:
            message += f" (got {item['input']!r})"
        problems.append(f"{key}: {message}")
    return "invalid configuration: " + "; ".join(problems)
