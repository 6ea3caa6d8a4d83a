"""The message path, top to bottom: route -> size check -> decode -> window -> micro-batch -> LiteRT -> document.

Nothing here knows MQTT. The transport hands over an :class:`Inbound` and gets back an outcome: an
:class:`Answer` to publish, :data:`NOTHING_OWED` (a protocol message, or a reading kept in a window), or ``None``
when the input went on to inference; its answer then arrives through the ``on_answer`` callback, exactly once.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from plcsense.errors import ErrorCode
from plcsense.models.bundle import Bundle, BundleError, SensorSpec, bundle_digest, load_bundle, split_outputs
from plcsense.models.inputs import InputError
from plcsense.worker import repository
from plcsense.worker.batching import MicroBatcher
from plcsense.worker.capture import Capture
from plcsense.worker.decoders import Decoded, Decoder, Lifecycle, make_decoder
from plcsense.worker.documents import ErrorDocument, ModelRef, Ranked, ResultDocument
from plcsense.worker.metrics import Metrics, RouteMetrics, route_metrics
from plcsense.worker.quiet_log import RateLimitedLog
from plcsense.worker.settings import RouteSettings, Settings
from plcsense.worker.topics import TopicFilter
from plcsense.worker.windows import WindowStore, reading_time

log = logging.getLogger("plcsense.worker")

TOP_K = 5
NOT_FINITE = (
    "the model's output is not finite (NaN or infinite) for this input: values far outside what it was trained on "
    "overflow it; check the sensor or camera for a fault value"
)


@dataclass(slots=True)
class Inbound:
    """One received input and where its answer goes; ``delivery`` is the transport's own handle, opaque here."""

    topic: str
    payload: bytes
    received: float = field(default_factory=time.monotonic)
    response_topic: str | None = None
    correlation: bytes | None = None
    delivery: Any = None
    route: Route | None = None
    decoded: Decoded | None = None
    decoding: Future[Answer | None] | None = None
    """Image routes: the decode running off the network thread (an error answer, or None once decoded)."""
    serving: Serving | None = None
    """The model version this input was taken for: a swap between two batches never mixes versions in one."""


@dataclass(slots=True)
class Answer:
    """A document to publish for an input."""

    topic: str
    body: bytes
    qos: int
    correlation: bytes | None = None
    route: str = ""


class _NothingOwed:
    def __repr__(self) -> str:
        return "NOTHING_OWED"


NOTHING_OWED: Final = _NothingOwed()
"""The input is handled and needs no answer (a Sparkplug DEATH, a reading that only fills a window)."""

Outcome = Answer | _NothingOwed


@dataclass(eq=False)
class Serving:
    """One loaded, verified model version with its decoder and windows; replaced whole, never edited."""

    bundle: Bundle
    decoder: Decoder
    windows: WindowStore | None
    stale_devices: set[str] = field(default_factory=set)
    """Devices whose window belonged to a version with another input spec: their next reading restarts it."""
    model_ref: ModelRef = field(init=False)

    def __post_init__(self) -> None:
        self.model_ref = ModelRef(name=self.bundle.manifest.name, version=self.bundle.manifest.version)

    @property
    def version(self) -> str:
        return self.bundle.manifest.version


@dataclass
class Route:
    settings: RouteSettings
    metrics: RouteMetrics
    name: str = field(init=False)
    filter: TopicFilter = field(init=False)
    serving: Serving | None = None
    candidate: Serving | None = None
    """A version tried beside the serving one (``candidate_mode``: shadow or canary)."""
    policy: str = "latest"
    """The version policy in force: the setting's, until a promote or rollback pins another."""
    candidate_policy: str | None = None
    """The candidate's version policy: the setting's, until a promote or rollback ends the trial."""
    load_error: str | None = None
    refused: set[tuple[Path, tuple]] = field(default_factory=set)
    """(folder, files stamp) of versions that failed a check: not retried (and not logged again) on every poll, only
    once a file in the folder changes."""
    batcher: MicroBatcher[Inbound] | None = field(default=None, repr=False)
    decode_pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    capture: Capture | None = field(default=None, repr=False)
    """Image routes decode off the MQTT network thread, on a bounded pool."""

    def __post_init__(self) -> None:
        self.name = self.settings.name
        self.filter = TopicFilter(self.settings.topic)
        self.metrics.windows.set_function(self._tracked_windows)  # read at scrape time, not set per reading
        self.policy = self.settings.version
        self.candidate_policy = self.settings.candidate

    @property
    def bundle(self) -> Bundle | None:
        return self.serving.bundle if self.serving else None

    def _tracked_windows(self) -> int:
        stores = {id(s.windows): s.windows for s in (self.serving, self.candidate) if s and s.windows is not None}
        return sum(len(w) for w in stores.values())

    def serving_for(self, topic: str) -> Serving | None:
        """The candidate for the canary share of devices (sticky: a device's readings stay on one model)."""
        canary = self.candidate is not None and self.settings.candidate_mode == "canary"
        if canary and zlib.crc32(topic.encode()) % 10_000 < self.settings.canary_percent * 100:
            return self.candidate
        return self.serving

    @property
    def max_pending(self) -> int | None:
        """Inputs of this route between receipt and answer; None: only the worker-wide ``max_inflight`` bounds it."""
        if self.settings.max_pending is not None or self.settings.encoding != "image":
            return self.settings.max_pending
        return 4 * self.settings.max_batch


def _template_regex(template: str, route: str) -> re.Pattern[str]:
    """A regex matching every topic a result/error template of ``route`` can produce (group ``topic``: the input)."""
    pattern, named = "", False
    for part in re.split(r"(\{topic\}|\{route\})", template):
        if part == "{topic}":
            pattern += ".+" if named else "(?P<topic>.+)"
            named = True
        else:
            pattern += re.escape(route) if part == "{route}" else re.escape(part)
    return re.compile(pattern + r"\Z")


def _files_stamp(path: Path) -> tuple:
    """Name, size, inode and modification time of every file in a bundle folder: what a new copy changes (even a
    copy of the same manifest over a half-copied one), read without opening a file."""
    try:
        stats = [(str(p.relative_to(path)), p.stat()) for p in path.rglob("*") if p.is_file()]
    except OSError:  # being replaced right now: the next reload looks again
        return ()
    return tuple(sorted((name, st.st_size, st.st_ino, st.st_mtime_ns) for name, st in stats))


def _same_input(a: Bundle, b: Bundle) -> bool:
    """Whether one decoded input (and one device's window) fits both models; normalisation lives in the graph."""
    x, y = a.manifest.input, b.manifest.input
    if isinstance(x, SensorSpec) and isinstance(y, SensorSpec):
        return x.channels == y.channels and x.window == y.window
    return x == y


class Pipeline:
    def __init__(self, settings: Settings, metrics: Metrics, on_answer: Callable[[Inbound, Answer], None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.routes = [Route(r, route_metrics(metrics, r.name)) for r in settings.routes]
        self._on_answer = on_answer
        self._output_patterns = [
            (route.filter, _template_regex(t, route.name))
            for route in self.routes
            for t in (route.settings.result_topic, route.settings.error_topic)
        ]
        self._status = TopicFilter("plcsense/+/status")
        self._control_replies = TopicFilter("plcsense/+/control/reply")
        self._reload_lock = threading.Lock()
        self._warnings = RateLimitedLog(log)

    # ----------------------------------------------------------------- models
    def load_models(self) -> None:
        """Load every route's model (and candidate), start its batcher; a broken one takes only its route down."""
        for route in self.routes:
            self._refresh(route)
            if route.settings.encoding == "image":
                route.decode_pool = ThreadPoolExecutor(
                    route.settings.decode_threads, thread_name_prefix=f"decode-{route.name}"
                )
            r = route.settings
            route.batcher = MicroBatcher(route.name, self._run_batch, r.max_batch, r.max_wait_ms / 1000)
            if r.capture is not None:
                route.capture = Capture(route.name, r.capture, self.metrics, self.settings.mqtt.client_id)

    def reload(self) -> None:
        """Look for new versions (poll, SIGHUP, control message): load and check each beside the old one and swap
        it in between two batches; a version that fails a check is refused and the old one keeps serving."""
        with self._reload_lock:
            for route in self.routes:
                self._refresh(route)

    def promote(self, name: str) -> str:
        """The candidate becomes the serving version (pinned), and the candidate slot empties."""
        route = self._named(name)
        if route.candidate is None:
            raise ValueError(f"route {name} has no candidate to promote")
        with self._reload_lock:
            route.policy = route.candidate.version
            self._swap(route, route.candidate)
            route.candidate = route.candidate_policy = None
        log.warning("route %s: promoted version %s", name, route.policy)
        return route.policy

    def rollback(self, name: str) -> str:
        """Back to the version before the serving one (pinned), dropping any candidate."""
        route = self._named(name)
        current = route.serving.version if route.serving else None
        older = repository.previous(route.settings.model, current) if current else None
        if older is None:
            raise ValueError(f"route {name}: no version before {current} in {route.settings.model}")
        with self._reload_lock:
            policy, route.policy = route.policy, older
            self._refresh(route)
            if route.serving is None or route.serving.version != older:  # refused: nothing changed
                route.policy = policy
                raise ValueError(
                    f"route {name}: version {older} was refused (the worker's log says why); still serving {current}"
                )
            route.candidate = route.candidate_policy = None
        log.warning("route %s: rolled back from %s to %s", name, current, older)
        return older

    def end_trial(self, name: str) -> str:
        """Drop the candidate (end a canary or shadow) and keep serving the current version."""
        route = self._named(name)
        with self._reload_lock:
            route.candidate = route.candidate_policy = None
        log.warning("route %s: candidate dropped", name)
        return route.serving.version if route.serving else "none"

    def _named(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise ValueError(f"no route {name!r}")

    def _refresh(self, route: Route) -> None:
        r = route.settings
        serving = self._version(route, route.policy, route.serving, pin=r.model_digest)
        if serving is not None and serving is not route.serving:
            self._swap(route, serving)
        if route.candidate_policy is not None:
            current, serving = route.candidate, route.serving
            if current is not None and serving is not None and not _same_input(serving.bundle, current.bundle):
                current = None  # loaded beside a version that has been replaced: checked again against this one
            route.candidate = self._version(route, route.candidate_policy, current, candidate=True)

    def _version(
        self, route: Route, policy: str, current: Serving | None, *, pin: str | None = None, candidate: bool = False
    ) -> Serving | None:
        """``current`` when the policy still picks it, a newly loaded version, or ``current`` again when the new
        one is refused (None only when nothing could ever be loaded)."""
        r, what = route.settings, "candidate" if candidate else "model"
        try:
            path = repository.resolve(r.model, policy, candidate=candidate)
        except (BundleError, OSError) as exc:  # OSError: the repository cannot be listed (a lost network mount)
            return self._refused(route, current, str(exc), what)
        try:
            digest = bundle_digest(path)
        except BundleError as exc:  # half-copied or unreadable: the next reload looks again
            return self._refused(route, current, str(exc), what)
        if current is not None and current.bundle.path == path and current.bundle.digest == digest:
            return current
        stamp = _files_stamp(path)
        if (path, stamp) in route.refused:  # the same files fail the same checks; a new copy is tried again
            return current
        base = route.serving if candidate else current
        try:
            bundle = load_bundle(path, expect_digest=pin)
            version = bundle.manifest.version
            if path != r.model and version != path.name:  # promote and rollback go by folder name
                raise BundleError(f"{path}: the manifest says version {version!r}, the folder {path.name!r}")
            self._check_fits(route, bundle)
            if candidate and base is not None and not _same_input(base.bundle, bundle):
                raise BundleError(f"candidate {path} takes another input than the serving model")
        except BundleError as exc:
            route.refused.add((path, stamp))
            self.metrics.model_loads.labels(route.name, "refused").inc()
            return self._refused(route, current, str(exc), what)
        self.metrics.model_loads.labels(route.name, "loaded").inc()
        manifest = bundle.manifest
        log.info(
            "route %s: %s %s v%s (%s, %s) on %s",
            route.name,
            what,
            manifest.name,
            manifest.version,
            manifest.task,
            bundle.digest,
            r.topic,
        )
        decoder = make_decoder(manifest, r)
        if base is not None:
            decoder.continue_from(base.decoder)
        return Serving(bundle, decoder, self._windows(route, bundle, base))

    def _refused(self, route: Route, current: Serving | None, why: str, what: str) -> Serving | None:
        if current is None and what == "model":
            route.load_error = why
            log.error("route %s: %s; its messages get a model_unavailable error", route.name, why)
        else:
            self._warnings.log(
                logging.ERROR,
                f"refused:{route.name}:{why}",
                "route %s: %s refused, the old one keeps serving: %s",
                route.name,
                what,
                why,
            )
        return current

    def _check_fits(self, route: Route, bundle: Bundle) -> None:
        r, spec = route.settings, bundle.manifest.input
        if (r.encoding == "image") != (spec.kind == "image"):
            raise BundleError(
                f"encoding {r.encoding} does not fit the model, which takes "
                f"{'images' if spec.kind == 'image' else 'sensor windows'}"
            )
        if self.settings.mqtt.shared_group and spec.kind == "sensor" and spec.window > 1 and not r.full_windows:
            raise BundleError(
                f"mqtt.shared_group {self.settings.mqtt.shared_group!r} would split each device's readings between "
                "workers, so sliding windows would skip readings and score wrong; give this route workers of its own "
                "without shared_group (split devices by topic filter), or set full_windows: true if every message "
                "carries a whole window"
            )

    def _windows(self, route: Route, bundle: Bundle, old: Serving | None) -> WindowStore | None:
        """Windows survive a new version with the same input spec; with another spec they restart."""
        spec, r = bundle.manifest.input, route.settings
        if spec.kind != "sensor":
            return None
        if old is not None and old.windows is not None and _same_input(old.bundle, bundle):
            return old.windows
        return WindowStore(
            spec.window,
            len(spec.channels),
            stride=r.window_stride,
            max_gap_s=r.max_gap_s,
            max_devices=r.max_devices,
            on_evict=route.metrics.evictions.inc,
        )

    def _swap(self, route: Route, serving: Serving) -> None:
        old = route.serving
        if old is not None and old.windows is not None and serving.windows is not old.windows:
            serving.stale_devices.update(old.windows.devices())
        route.serving = serving  # one assignment: inputs taken from now on carry the new version
        route.load_error = None
        manifest = serving.bundle.manifest
        labels = (route.name, manifest.name, manifest.version)
        self.metrics.inference.labels(*labels)  # the series exist before the first batch, for rate() and joins
        self.metrics.batch_size.labels(*labels)
        if old is not None:
            self.metrics.model_info.remove(route.name, old.bundle.manifest.name, old.version)
            log.warning(
                "route %s: now serving %s v%s (was v%s)", route.name, manifest.name, manifest.version, old.version
            )
        self.metrics.model_info.labels(route.name, manifest.name, manifest.version).set(1)

    def close(self, timeout: float = 5.0) -> None:
        for route in self.routes:
            if route.decode_pool:
                route.decode_pool.shutdown(wait=True)
            if route.batcher:
                route.batcher.close(timeout)

    @property
    def broken_routes(self) -> list[str]:
        return [f"{r.name}: {r.load_error}" for r in self.routes if r.serving is None]

    # ----------------------------------------------------------------- routing
    def route_for(self, topic: str) -> Route | None:
        """The route that takes ``topic``; None for answers and status topics (ours or a sibling's)."""
        if self._is_output(topic):
            return None
        for route in self.routes:
            if route.filter.matches(topic):
                return route
        return None

    def _is_output(self, topic: str) -> bool:
        if (
            topic == self.settings.mqtt.status_topic
            or self._status.matches(topic)
            or self._control_replies.matches(topic)
        ):
            return True
        for route_filter, pattern in self._output_patterns:
            match = pattern.match(topic)
            if match and ("topic" not in match.groupdict() or route_filter.matches(match["topic"])):
                return True
        return False

    # ----------------------------------------------------------------- the message path
    def handle(self, inbound: Inbound) -> Outcome | None:
        """Take one input of ``inbound.route``; None means it went on to inference and is answered later."""
        route = inbound.route
        assert route is not None
        route.metrics.messages.inc()
        try:
            limit = route.settings.max_payload_bytes
            if len(inbound.payload) > limit:
                raise InputError(
                    ErrorCode.PAYLOAD_TOO_LARGE, f"payload is {len(inbound.payload)} bytes, limit is {limit}"
                )
            inbound.serving = route.serving_for(inbound.topic)
            if inbound.serving is None:
                raise InputError(ErrorCode.MODEL_UNAVAILABLE, route.load_error or "model not loaded")
            if route.decode_pool is not None:  # decoded in parallel, answered in arrival order by the batcher
                assert route.batcher is not None
                inbound.decoding = route.decode_pool.submit(self._decode_image, inbound)
                route.batcher.submit(inbound)
                return None
            return self._decode_and_queue(inbound)
        except InputError as exc:
            return self.error(inbound, ErrorCode(exc.code), exc.detail, exc.id)
        except Exception as exc:  # a bug must answer this input, not stop the MQTT loop
            log.exception("route %s: unexpected failure on %s", route.name, inbound.topic)
            return self.error(inbound, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _decode_image(self, inbound: Inbound) -> Answer | None:
        route, serving = inbound.route, inbound.serving
        assert route is not None and serving is not None
        try:
            decoded = serving.decoder.decode(inbound.topic, inbound.payload)
            assert isinstance(decoded, Decoded)
            inbound.decoded = decoded
            return None
        except InputError as exc:
            return self.error(inbound, ErrorCode(exc.code), exc.detail, exc.id)
        except Exception as exc:
            log.exception("route %s: unexpected failure decoding %s", route.name, inbound.topic)
            return self.error(inbound, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _decode_and_queue(self, inbound: Inbound) -> Outcome | None:
        route, serving = inbound.route, inbound.serving
        assert route is not None and serving is not None and route.batcher is not None
        decoded = serving.decoder.decode(inbound.topic, inbound.payload)
        windows = serving.windows
        if isinstance(decoded, Lifecycle):
            if decoded.forget and windows is not None:
                windows.forget(decoded.forget)
            return NOTHING_OWED
        inbound.decoded = decoded
        if decoded.is_reading:
            assert windows is not None
            if route.settings.full_windows:
                shape = list(serving.bundle.manifest.input.shape)
                raise InputError(ErrorCode.BAD_SHAPE, f"route takes whole windows of shape {shape} (full_windows)")
            device = decoded.device or inbound.topic
            pushed = windows.push(
                device, decoded.array, decoded.seconds if decoded.seconds is not None else reading_time(decoded.ts)
            )
            if device in serving.stale_devices:
                serving.stale_devices.discard(device)
                raise InputError(
                    ErrorCode.WINDOW_RESET,
                    f"model v{serving.version} takes another input than the version before; the window restarts",
                )
            if pushed.clock_back_s is not None:
                raise InputError(
                    ErrorCode.WINDOW_RESET,
                    f"this reading's time is {pushed.clock_back_s:.1f} s before the last one of {device}: its clock "
                    "went back (or the last time was wrong); the window restarts with this reading",
                )
            if pushed.gap_s is not None:
                raise InputError(
                    ErrorCode.WINDOW_RESET,
                    f"{pushed.gap_s:.1f} s since the last reading (max_gap_s {route.settings.max_gap_s}); "
                    "the window restarts with this reading",
                )
            if pushed.window is None:  # window still filling (or between strides): the reading is kept
                return NOTHING_OWED
            decoded.array = pushed.window
        route.batcher.submit(inbound)
        return None

    # ----------------------------------------------------------------- inference and answers
    def _run_batch(self, batch: Sequence[Inbound]) -> None:
        """Run the decoded inputs of ``batch`` in one invoke; answer all of them in arrival order."""
        answers: list[Answer | None] = [i.decoding.result() if i.decoding else None for i in batch]
        shadows: list[Callable[[], None]] = []
        try:
            ready = [k for k, answer in enumerate(answers) if answer is None]
            for serving in dict.fromkeys(batch[k].serving for k in ready):  # versions in arrival order
                group = [k for k in ready if batch[k].serving is serving]
                for k, answer in zip(group, self._infer([batch[k] for k in group], shadows), strict=True):
                    answers[k] = answer
        except Exception as exc:  # a bug: each input still gets an answer, or it would hold flow control for good
            log.exception("route %s: unexpected failure in a batch of %d", batch[0].route.name, len(batch))  # type: ignore[union-attr]
            detail = f"{type(exc).__name__}: {exc}"
            answers = [
                a if a is not None else self.error(i, ErrorCode.INTERNAL, detail)
                for i, a in zip(batch, answers, strict=True)
            ]
        for inbound, answer in zip(batch, answers, strict=True):
            assert answer is not None
            self._on_answer(inbound, answer)
        for shadow in shadows:  # after the answers: a shadow costs throughput, never the served answers' latency
            shadow()

    def _infer(self, batch: list[Inbound], shadows: list[Callable[[], None]]) -> list[Answer]:
        """Answers for inputs of one version; a shadow candidate's run on the same inputs goes into ``shadows``."""
        route, serving = batch[0].route, batch[0].serving
        assert route is not None and serving is not None
        bundle = serving.bundle
        try:
            inputs = np.array([i.decoded.array for i in batch])  # type: ignore[union-attr]
            outputs = self._predict(route, bundle, inputs)
            if serving is route.candidate:
                self.metrics.canary_inputs.labels(route.name, serving.version).inc(len(batch))
            candidate = route.candidate
            if candidate is not None and route.settings.candidate_mode == "shadow" and serving is route.serving:
                shadows.append(functools.partial(self._shadow, route, candidate, serving, inputs, outputs))
        except Exception as exc:
            log.exception("inference failed for %s", bundle.label)
            return [self.error(i, ErrorCode.INFERENCE_FAILED, f"{type(exc).__name__}: {exc}") for i in batch]
        answers = []
        # One split, one conversion and one rounding per batch: the documents are built from Python floats
        # (per-element NumPy scalars and round() calls cost more than the whole LiteRT invoke of a small sensor model).
        manifest = bundle.manifest
        values, ood = split_outputs(manifest, outputs) if manifest.task == "classification" else (outputs, None)
        shown = np.round(values, 6).tolist()
        oods = [None] * len(batch) if ood is None else ood.tolist()
        finite = np.isfinite(outputs).all(axis=1).tolist()
        results = 0
        for inbound, output, rounded, ood_score, ok in zip(batch, values.tolist(), shown, oods, finite, strict=True):
            if not ok:  # NaN > threshold is False: a NaN score would read as "normal", a NaN probability as a label
                answers.append(self.error(inbound, ErrorCode.INFERENCE_FAILED, NOT_FINITE))
                continue
            try:
                answers.append(self.result(inbound, serving, output, rounded, ood_score))
                results += 1
            except Exception as exc:
                log.exception("cannot build a result for %s", inbound.topic)
                answers.append(self.error(inbound, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        route.metrics.results.inc(results)
        if route.capture is not None:
            self._capture(route.capture, bundle, batch, answers)
        return answers

    def _capture(self, capture: Capture, bundle: Bundle, batch: list[Inbound], answers: list[Answer]) -> None:
        """Offer each result to the route's capture; a capture failure costs that capture, never the answers."""
        spec = bundle.manifest.input
        channels = spec.channels if isinstance(spec, SensorSpec) else None
        for inbound, answer in zip(batch, answers, strict=True):
            try:
                doc = json.loads(answer.body)
                if "error" not in doc:
                    capture.offer(doc, inbound.payload, inbound.decoded.array, channels)  # type: ignore[union-attr]
            except Exception:
                capture.failed()
                self._warnings.log(
                    logging.ERROR, f"capture:{capture.route}", "route %s: capture failed", capture.route, exc_info=True
                )

    def _predict(self, route: Route, bundle: Bundle, inputs: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        outputs = bundle.model.predict(inputs)
        labels = (route.name, bundle.manifest.name, bundle.manifest.version)
        self.metrics.inference.labels(*labels).observe(time.perf_counter() - started)
        self.metrics.batch_size.labels(*labels).observe(len(inputs))
        return outputs

    def _shadow(
        self, route: Route, candidate: Serving, serving: Serving, inputs: np.ndarray, served: np.ndarray
    ) -> None:
        """The candidate answers the same inputs as ``serving`` did (``served``), for the metrics only: agreement,
        score difference, latency. A failure is logged and costs nothing else."""
        try:
            tried = self._predict(route, candidate.bundle, inputs)
            manifest, old = candidate.bundle.manifest, serving.bundle.manifest
            if manifest.task == "classification":  # the ood score, when a bundle has one, is not a class
                tried, served = split_outputs(manifest, tried)[0], split_outputs(old, served)[0]
                agree = np.argmax(tried, axis=1) == np.argmax(served, axis=1)
                diff = np.abs(np.max(tried, axis=1) - np.max(served, axis=1))
            else:
                assert manifest.threshold is not None and old.threshold is not None
                agree = (tried.mean(axis=1) > manifest.threshold) == (served.mean(axis=1) > old.threshold)
                diff = np.abs(tried.mean(axis=1) - served.mean(axis=1))
        except Exception:
            self._warnings.log(
                logging.ERROR, f"shadow:{route.name}", "route %s: shadow candidate failed", route.name, exc_info=True
            )
            return
        m = self.metrics
        m.shadow_inputs.labels(route.name, manifest.version).inc(len(agree))
        m.shadow_agreements.labels(route.name, manifest.version).inc(int(agree.sum()))
        for d in diff:
            m.shadow_score_difference.labels(route.name, manifest.version).observe(float(d))

    def result(
        self, inbound: Inbound, serving: Serving, output: list[float], shown: list[float], ood: float | None = None
    ) -> Answer:
        """The result document for one input: ``output`` is the model's output row for it (a classifier's class
        probabilities, without the ood element), ``shown`` the same rounded to 6 decimals for the document
        (decisions are taken on ``output``) and ``ood`` a classifier's out-of-distribution score, if it has one."""
        route, decoded, manifest = inbound.route, inbound.decoded, serving.bundle.manifest
        assert route is not None and decoded is not None
        fields: dict[str, Any] = {}
        if manifest.task == "classification":
            assert manifest.labels is not None
            order = sorted(range(len(output)), key=output.__getitem__, reverse=True)[:TOP_K]
            fields["label"] = manifest.labels[order[0]]
            fields["score"] = shown[order[0]]
            fields["top"] = [Ranked(label=manifest.labels[i], score=shown[i]) for i in order]
            if ood is not None and manifest.ood is not None:
                fields["ood_score"] = round(ood, 6)
                fields["unknown"] = ood > manifest.ood.threshold
                if fields["unknown"]:
                    route.metrics.unknown.inc()
        else:
            assert manifest.threshold is not None
            score = sum(output) / len(output)
            channels = manifest.input.channels  # type: ignore[union-attr]
            fields["score"] = round(score, 6)
            fields["threshold"] = round(manifest.threshold, 6)
            fields["is_anomaly"] = score > manifest.threshold
            fields["channels"] = dict(zip(channels, shown, strict=True))
            if fields["is_anomaly"]:
                route.metrics.anomalies.inc()
        latency = time.monotonic() - inbound.received
        doc = ResultDocument(
            id=decoded.id,
            topic=inbound.topic,
            model=serving.model_ref,
            task=manifest.task,
            latency_ms=round(latency * 1000, 3),
            ts=decoded.ts if decoded.ts is not None else time.time(),
            **fields,
        )
        route.metrics.latency.observe(latency)
        topic = inbound.response_topic or route.settings.result_topic.format(topic=inbound.topic, route=route.name)
        return Answer(topic, doc.to_json(), route.settings.qos, inbound.correlation, route.name)

    def error(self, inbound: Inbound, code: ErrorCode, detail: str, msg_id: str | None = None) -> Answer:
        route = inbound.route
        assert route is not None
        route.metrics.errors[code].inc()
        self._warnings.log(
            logging.WARNING, f"{route.name}:{code}", "route %s: %s on %s: %s", route.name, code, inbound.topic, detail
        )
        doc = ErrorDocument(
            error=code,
            detail=detail[:500],
            topic=inbound.topic,
            id=inbound.decoded.id if inbound.decoded else msg_id,
            ts=time.time(),
        )
        topic = inbound.response_topic or route.settings.error_topic.format(topic=inbound.topic, route=route.name)
        return Answer(topic, doc.to_json(), route.settings.qos, inbound.correlation, route.name)
