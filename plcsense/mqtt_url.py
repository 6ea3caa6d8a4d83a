"""Building a paho client from an ``mqtt://`` / ``mqtts://`` URL, for the simulator and the demo."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt


def client_for(url: str, *, client_id: str = "", protocol: str = "5") -> mqtt.Client:
    """A client for ``url``; user:password in the URL are used, mqtts:// enables TLS with system CAs."""
    parts = urlsplit(url)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )
    if parts.username:
        client.username_pw_set(unquote(parts.username), unquote(parts.password or "") or None)
    if parts.scheme in ("mqtts", "ssl"):
        client.tls_set()
    return client


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    tls = parts.scheme in ("mqtts", "ssl")
    return parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883)
