"""Worker settings: a YAML file overridden by ``PLCSENSE_...`` environment variables (nested with ``__``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from plcsense.models.inputs import PILLOW_MAX_PIXELS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class MqttSettings(_Section):
    url: str = "mqtt://127.0.0.1:1883"
    """``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""
    client_id: str = Field("plcsense-worker", min_length=1, max_length=120)
    """Stable id: the broker keeps this client's session (and queued messages) across restarts. Answers go out
    on a second connection, ``<client_id>-answers``."""
    protocol: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    """Read the password from this file (a Docker or Kubernetes secret) instead of ``password``."""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    """Skip the server hostname check (only for brokers addressed by an IP their certificate lacks)."""
    keepalive_s: int = Field(30, ge=5, le=65535)  # MQTT's two-byte field
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, le=2**32 - 1)
    """How long the broker keeps the session (and messages for it) while the worker is away (MQTT 5)."""
    reconnect_min_s: int = Field(1, ge=1)
    reconnect_max_s: int = Field(30, ge=1)
    """Reconnect delays, doubling from min to max (whole seconds: paho rounds them down, and 0 would retry in a
    tight loop)."""
    max_inflight: int = Field(64, ge=1, le=65535)
    """Messages delivered but not yet answered; sent to the broker as MQTT 5 Receive Maximum."""
    shared_group: str | None = None
    """Subscribe as ``$share/<group>/<filter>`` so several workers split the load (MQTT 5)."""
    topic_prefix: str | None = None
    """Prefix of the availability topic ``<prefix>/status``; default ``plcsense/<client_id>``."""

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError("must look like mqtt://host:1883 or mqtts://host:8883")
        return url

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl")

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def status_topic(self) -> str:
        return f"{self.topic_prefix or 'plcsense/' + self.client_id}/status"

    @property
    def control_topic(self) -> str:
        return f"{self.topic_prefix or 'plcsense/' + self.client_id}/control"

    @model_validator(mode="after")
    def _consistent(self) -> MqttSettings:
        parts = urlsplit(self.url)
        if parts.username or parts.password:
            raise ValueError("put credentials in mqtt.username / mqtt.password, not in the url")
        if not self.tls and (self.ca_file or self.cert_file or self.tls_insecure):
            raise ValueError("TLS settings given but the url is not mqtts://; use mqtts://host:8883")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s {self.reconnect_max_s} is below reconnect_min_s {self.reconnect_min_s}")
        if self.shared_group and self.protocol != "5":
            raise ValueError("shared_group needs protocol 5")
        if self.password_file is not None:
            if self.password is not None:
                raise ValueError("give password or password_file, not both")
            if not Path(self.password_file).is_file():
                raise ValueError(f"password_file {self.password_file} does not exist")
            self.password = SecretStr(Path(self.password_file).read_text().strip())
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        return self


class ModelsSettings(_Section):
    poll_s: float = Field(10.0, ge=0)
    """How often routes look for new versions in their repository entries; 0: only on SIGHUP or a control
    message."""
    control: bool = True
    """Take commands (``reload``, ``promote``, ``rollback``) on ``<prefix>/control``: whoever the broker's ACL lets
    write that topic controls the worker's models, so grant it to operators only."""


class MetricsSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(9108, ge=0, le=65535)
    """HTTP port for /metrics, /healthz and /readyz; 0 disables the server."""


class CaptureSettings(_Section):
    dir: Path
    """Where captured inputs go, in the folder layout ``plcsense train`` reads (one folder per predicted label)."""
    max_files: int = Field(10_000, ge=1)
    max_bytes: int = Field(1 << 30, ge=1)
    """Capture stops (counted as ``full``) once the directory holds this many files or bytes."""
    sample_percent: float = Field(0.0, ge=0, le=100)
    """A random share of all answered inputs, uncertain or not."""
    below_score: float | None = Field(None, gt=0, le=1)
    """Classification: capture answers whose top-1 score is below this."""
    near_threshold: float | None = Field(None, gt=0)
    """Anomaly: capture answers whose score is within this fraction of the threshold (0.2: +-20 %)."""


class RouteSettings(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    topic: str = Field(min_length=1)
    """MQTT topic filter, ``+`` and ``#`` allowed."""
    model: Path
    """A bundle directory, or a model repository entry ``<repo>/<name>`` whose subfolders are versions, each a
    bundle (relative paths resolve against the working directory, then the config file)."""
    version: str = Field("latest", min_length=1)
    """Repository entries: ``latest`` (the highest version, picked up while serving) or a pinned version."""
    candidate: str | None = None
    """Repository entries: a version to try beside the serving one (``latest`` follows new versions)."""
    candidate_mode: Literal["shadow", "canary"] = "shadow"
    """``shadow``: the candidate answers every input for the metrics only; ``canary``: it answers for real for
    ``canary_percent`` of devices (by topic, so a device stays on one model)."""
    canary_percent: float = Field(10.0, ge=0, le=100)
    capture: CaptureSettings | None = None
    """Write uncertain or sampled inputs for labelling and retraining (answers flagged unknown always count)."""
    model_digest: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    """Pin the bundle: ``sha256:...`` as ``plcsense`` printed at export (``bundle.sha256``); any other bundle at
    ``model``, or an edited one, is refused and the route answers ``model_unavailable``."""
    encoding: Literal["json", "npy", "image", "sparkplug"] = "json"
    """``sparkplug``: Sparkplug B protobuf; metrics map onto the model's channels by name (subscribe to the
    BIRTH topics too, e.g. ``spBv1.0/<group>/+/<edge node>/#``, so metrics sent by alias resolve)."""
    result_topic: str = "{topic}/result"
    error_topic: str = "{topic}/error"
    max_payload_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_batch: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(0.0, ge=0)
    """How long the first message of a batch waits for company before the batch runs. 0: no waiting; a batch is
    what queued up while the previous one ran, so batches grow with load and an idle route answers at once."""
    qos: Literal[0, 1] = 1
    """1: nothing lost (inputs acknowledged only once answered); 0: fire and forget, for high-rate data.
    QoS 2 is not offered: the broker considers a QoS 2 message delivered before the worker has answered it."""
    window_stride: int = Field(1, ge=1)
    """Windowed sensor models: score every n-th reading once the window is full."""
    max_gap_s: float | None = Field(None, gt=0)
    """Windowed sensor models: a longer silence (by the readings' ts, else arrival) restarts the window."""
    max_devices: int = Field(10_000, ge=1)
    """Windowed sensor models: devices (topics) tracked at once; the least recently seen is dropped."""
    max_pending: int | None = Field(None, ge=1)
    """Inputs of this route received and not yet answered; when reached, intake waits (nothing is dropped).
    Default: 4 x max_batch for image routes (decoded images are large), otherwise only ``mqtt.max_inflight``."""
    full_windows: bool = False
    """Sensor routes: every message carries a whole window, so the route keeps no per-device state and may be
    shared between workers (``mqtt.shared_group``); single readings are refused with ``bad_shape``."""
    decode_threads: int = Field(2, ge=1, le=64)
    """Image routes: images decoded at once, off the MQTT network thread."""
    max_image_pixels: int | None = Field(None, ge=1, le=PILLOW_MAX_PIXELS)
    """Image routes: images declaring more pixels are refused (``image_too_large``) before decoding.
    Default: 64 x the model's input, at least 4096 x 4096; at most 128 million (Pillow's own limit)."""

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, topic: str) -> str:
        if topic.startswith(("$share/", "$queue/")):
            raise ValueError(
                f"{topic!r}: give the plain filter here and the group as mqtt.shared_group; the worker subscribes "
                "as $share/<group>/<filter> itself"
            )
        levels = topic.split("/")
        for i, level in enumerate(levels):
            if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
                raise ValueError(f"{topic!r} is not a valid MQTT topic filter")
        return topic

    @field_validator("result_topic", "error_topic")
    @classmethod
    def _template(cls, template: str) -> str:
        if "{topic}" not in template and "{route}" not in template:
            raise ValueError("template needs {topic} or {route}, e.g. '{topic}/result'")
        if "+" in template or "#" in template:
            raise ValueError(f"{template!r}: an answer goes to one topic; '+' and '#' are for filters")
        if template == "{topic}":
            raise ValueError("'{topic}' alone would answer on the input's own topic; e.g. '{topic}/result'")
        try:
            template.format(topic="t", route="r")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad template ({exc}); placeholders are {{topic}} and {{route}}") from None
        return template


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PLCSENSE_", env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True
    )

    mqtt: MqttSettings = MqttSettings()
    metrics: MetricsSettings = MetricsSettings()
    models: ModelsSettings = ModelsSettings()
    routes: list[RouteSettings] = Field(min_length=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (time, level, logger, message), for Loki, Elasticsearch and the like."""

    @field_validator("routes")
    @classmethod
    def _unique_names(cls, routes: list[RouteSettings]) -> list[RouteSettings]:
        names = [r.name for r in routes]
        if len(set(names)) != len(names):
            raise ValueError("route names must be unique")
        return routes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file, so one YAML serves a fleet and each gateway overrides what differs.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def load_settings(config: Path | None) -> Settings:
    """Read ``config`` (YAML) with environment overrides; raise ``pydantic.ValidationError`` when invalid."""
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"config file {config} not found")
    from_file = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": config}})
    settings = from_file()
    if config is not None:
        for route in settings.routes:
            if not route.model.is_absolute() and not route.model.exists():
                beside = config.parent / route.model
                if beside.exists():
                    route.model = beside
    return settings
