"""Logging as JSON lines, metrics in the Prometheus text format, and the /healthz + /metrics server."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no ``*_created`` series beside each counter: nothing here reads them


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "service": self.service,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def kv(**fields) -> dict:
    """``log.info("msg", extra=kv(stream_id=...))`` puts fields into the JSON line."""
    return {"fields": fields}


class Metrics:
    """A service's counters and gauges on prometheus_client, each named on first use with the label
    names it is used with: ``inc("records_in_total", topic=t)`` is the counter
    ``hark_records_in_total{service=..., topic=...}``. A name keeps its labels; using it with
    others is a programming error (ValueError)."""

    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._metrics: dict[str, Counter | Gauge] = {}

    def _series(self, kind: type[Counter] | type[Gauge], name: str, labels: dict):
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = kind(
                    f"hark_{name}",
                    name.replace("_", " "),
                    ["service", *sorted(labels)],
                    registry=self.registry,
                )
        if not isinstance(metric, kind):
            raise ValueError(f"metric {name} is a {type(metric).__name__}, not a {kind.__name__}")
        return metric.labels(service=self.service, **{k: str(v) for k, v in labels.items()})

    def inc(self, name: str, by: float = 1.0, **labels) -> None:
        self._series(Counter, name, labels).inc(by)

    def total(self, name: str, value: float, **labels) -> None:
        """A counter kept elsewhere (a processor's monotonic count), brought up to ``value``."""
        behind = value - self.get(name, **labels)  # prometheus_client counters only go up: by the difference
        if behind > 0:
            self.inc(name, behind, **labels)

    def set(self, name: str, value: float, **labels) -> None:
        self._series(Gauge, name, labels).set(value)

    def drop(self, name: str, **labels) -> None:
        """Forget a labelled series (e.g. the lag of a partition this process no longer owns)."""
        metric = self._metrics.get(name)
        values = (self.service, *(str(labels[k]) for k in sorted(labels)))
        if metric is not None:
            with contextlib.suppress(KeyError):  # a series never set: nothing to forget
                metric.remove(*values)

    def get(self, name: str, **labels) -> float:
        """A series' value (0 when never set), from its own metric's samples, not the whole
        registry's: observe_decode reads two at every chunk."""
        metric = self._metrics.get(name)
        want = {"service": self.service, **{k: str(v) for k, v in labels.items()}}
        for family in metric.collect() if metric is not None else ():
            for sample in family.samples:
                if sample.labels == want:
                    return sample.value
        return 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/healthz`` (200 when the service says it is healthy, else 503) and ``/metrics``."""

    def __init__(self, host: str, port: int, service: str, healthy, metrics: Metrics):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/healthz"):
                    ok, detail = healthy()
                    body = json.dumps({"service": service, "status": "ok" if ok else "unhealthy", **detail})
                    self._send(200 if ok else 503, body.encode(), "application/json")
                elif self.path.startswith("/metrics"):
                    self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code, body, ctype):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)
        outer._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
