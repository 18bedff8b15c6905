"""Logging as JSON lines, metrics in the Prometheus text format, and the /healthz + /metrics server."""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
    """Counters and gauges, optionally labelled, rendered in the Prometheus text format."""

    def __init__(self, service: str):
        self.service = service
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}  # (name, labels) -> value
        self._kinds: dict[str, str] = {}  # name -> counter | gauge

    def inc(self, name: str, by: float = 1.0, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._kinds.setdefault(name, "counter")
            self._values[key] = self._values.get(key, 0.0) + by

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._kinds.setdefault(name, "gauge")
            self._values[(name, tuple(sorted(labels.items())))] = value

    def drop(self, name: str, **labels) -> None:
        """Forget a labelled series (e.g. the lag of a partition this process no longer owns)."""
        with self._lock:
            self._values.pop((name, tuple(sorted(labels.items()))), None)

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            by_name: dict[str, list] = {}
            for (name, labels), v in sorted(self._values.items(), key=lambda kv_: (kv_[0][0], str(kv_[0][1]))):
                by_name.setdefault(name, []).append((labels, v))
            for name, series in by_name.items():
                full = f"hark_{name}"
                lines.append(f"# TYPE {full} {self._kinds[name]}")
                for labels, v in series:
                    text = ",".join(f'{k}="{_escape(str(val))}"' for k, val in (("service", self.service), *labels))
                    lines.append(f"{full}{{{text}}} {v}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
                    self._send(200, metrics.render().encode(), "text/plain; version=0.0.4")
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
