"""``encoding: sparkplug``: Sparkplug B protobuf; metrics map onto the model's channels by name."""

from __future__ import annotations

import contextlib

from plcsense.errors import ErrorCode
from plcsense.models.bundle import Manifest, SensorSpec
from plcsense.models.inputs import InputError
from plcsense.worker.decoders.base import Decoded, Decoder, Lifecycle, as_tensor, checked
from plcsense.worker.settings import RouteSettings
from plcsense.worker.sparkplug import AliasTable, parse_topic


class SparkplugDecoder(Decoder):
    encoding = "sparkplug"

    def __init__(self, manifest: Manifest, route: RouteSettings) -> None:
        super().__init__(manifest, route)
        self.aliases = AliasTable(route.max_devices)

    def continue_from(self, previous: Decoder) -> None:
        """The aliases are the devices' (learnt from their BIRTHs), not the model's: a new version without them
        would refuse every alias-only DATA until each device happened to rebirth."""
        if isinstance(previous, SparkplugDecoder):
            self.aliases = previous.aliases

    def decode(self, topic: str, payload: bytes) -> Decoded | Lifecycle:
        if not isinstance(self.spec, SensorSpec):
            raise InputError(ErrorCode.BAD_ENCODING, "route encoding is sparkplug but the model takes images")
        parsed = parse_topic(topic)
        if parsed is None:
            raise InputError(
                ErrorCode.BAD_SPARKPLUG, "not a Sparkplug B topic (spBv1.0/<group>/<type>/<node>[/<device>])"
            )
        device = "/".join(p for p in parsed.key if p)  # BIRTH and DATA of one device share a window
        if parsed.message_type in ("NDEATH", "DDEATH", "NCMD", "DCMD"):
            with contextlib.suppress(InputError):  # lifecycle: forget the aliases, nothing to answer
                self.aliases.decode(parsed, payload)
            # readings from before and after a rebirth must not share a window
            return Lifecycle(forget=device if parsed.message_type.endswith("DEATH") else None)
        reading = self.aliases.decode(parsed, payload)
        msg_id = None if reading.seq is None else str(reading.seq)
        try:
            ms = reading.timestamp_ms
            seconds = None if ms is None else ms / 1000
            decoded = Decoded(as_tensor(reading.metrics, self.spec), msg_id, ms, device=device, seconds=seconds)
            return checked(decoded, self.spec)
        except InputError as exc:
            exc.id = msg_id
            raise
