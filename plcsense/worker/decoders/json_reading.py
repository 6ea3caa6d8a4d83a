"""``encoding: json``: a JSON array, or ``{"data": [...] | {"channel": value}, "id": ..., "ts": ...}``."""

from __future__ import annotations

import json

from plcsense.errors import ErrorCode
from plcsense.models.inputs import InputError
from plcsense.worker.decoders.base import Decoded, Decoder, as_tensor, checked, checked_ts, message_id


class JsonDecoder(Decoder):
    encoding = "json"

    def decode(self, topic: str, payload: bytes) -> Decoded:
        try:
            doc = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(ErrorCode.INVALID_JSON, f"payload is not valid JSON ({exc})") from None
        except ValueError as exc:  # integers of thousands of digits (Python's int conversion limit)
            raise InputError(ErrorCode.INVALID_JSON, f"payload has an unreadable number ({exc})") from None
        if isinstance(doc, list):
            return checked(Decoded(as_tensor(doc, self.spec)), self.spec)
        if not isinstance(doc, dict):
            raise InputError(
                ErrorCode.INVALID_JSON, "payload must be a JSON array of numbers or an object with a data field"
            )
        msg_id = message_id(doc.get("id"))
        try:
            if "data" not in doc:
                raise InputError(ErrorCode.INVALID_JSON, 'a JSON object payload needs a "data" field')
            ts = checked_ts(doc.get("ts"))
            return checked(Decoded(as_tensor(doc["data"], self.spec), msg_id, ts), self.spec)
        except InputError as exc:
            exc.id = msg_id
            raise
