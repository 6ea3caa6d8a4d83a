"""Building a paho client from an ``mqtt://`` / ``mqtts://`` URL, for the simulator, the demo and the harness."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt


def client_for(
    url: str,
    *,
    client_id: str = "",
    protocol: str = "5",
    persistent: bool = False,
    manual_ack: bool = False,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | str | None = None,
    cert_file: Path | str | None = None,
    key_file: Path | str | None = None,
) -> mqtt.Client:
    """A client for ``url``, not yet connected.

    Credentials come from ``username``/``password`` or else from the URL; ``mqtts://`` enables TLS, trusting
    ``ca_file`` when given and the system CAs otherwise. ``persistent`` asks MQTT 3.1.1 for a kept session (MQTT 5
    asks for it when connecting, see :func:`plcsense.harness.connect`).
    """
    parts = urlsplit(url)
    v5 = protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
    )
    client.manual_ack_set(manual_ack)
    user = username if username is not None else unquote(parts.username) if parts.username else None
    if user:
        secret = password if username is not None else unquote(parts.password or "")
        client.username_pw_set(user, secret or None)
    if is_tls(url):
        client.tls_set(
            ca_certs=str(ca_file) if ca_file else None,
            certfile=str(cert_file) if cert_file else None,
            keyfile=str(key_file) if key_file else None,
        )
    return client


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme in ("mqtts", "ssl")


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (8883 if is_tls(url) else 1883)


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
