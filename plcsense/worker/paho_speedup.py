"""paho-mqtt's MQTT 5 ``Properties`` without its per-packet set-up cost.

paho builds a ``Properties`` for every PUBLISH and PUBACK it reads, and each one rebuilds two constant tables of
27 entries (with 27 ``list.index`` calls); ``clear()``, run on every unpack, then rewrites all 27 names to look
for attributes to delete. With paho-mqtt 2.2 that was 28 % of the worker's GIL time at full load (py-spy), and
sharing the tables (paho only reads them) took the worker from 120 to 85 microseconds of CPU per message.

Applied once, when the worker's transport is imported, and only when ``Properties`` still looks as measured: a
paho that changed it keeps its own code.
"""

from __future__ import annotations

import logging
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("plcsense.worker")

_TABLES = ("types", "names", "properties")
_OWN = frozenset({"packetType", *_TABLES})


def share_property_tables() -> bool:
    """Make ``Properties`` share paho's constant tables; returns whether it was applied (or already was)."""
    if getattr(Properties, "_plcsense_shared", False):
        return True
    template = Properties(PacketTypes.PUBLISH)
    if set(vars(template)) != _OWN or not hasattr(Properties, "clear"):
        log.debug("paho-mqtt's Properties has changed; its tables are not shared")
        return False
    tables = {name: getattr(template, name) for name in _TABLES}

    def __init__(self: Any, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)
        for name, table in tables.items():
            object.__setattr__(self, name, table)

    def clear(self: Any) -> None:
        """Delete the properties set on this object (paho's own tables stay)."""
        for name in [n for n in vars(self) if n not in _OWN]:
            delattr(self, name)

    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    Properties._plcsense_shared = True  # type: ignore[attr-defined]
    return True
