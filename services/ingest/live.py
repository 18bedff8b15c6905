"""One live connection's stream (``format=pcm_s16le``): read, pace, publish, and end the stream
whatever the client sends or does.

The stream's end is published and every slot it holds (admission, its audio partition) released
in ``finally``: a client that sends something no one foresaw, a bug, or the server's shutdown
still ends the stream (ERROR or ABORTED, with the reason), so nothing stays half open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from hark.audio import TARGET_RATE, AudioError, PcmResampler, SourceInfo
from hark.languages import AUTO
from hark.params import parse_count
from hark.runtime import kv

from .archive import SegmentWriter, source_segment_bytes
from .core import Ingest
from .pacing import Pacer
from .publisher import StreamPublisher, StreamSummary

log = logging.getLogger("hark.ingest")

# How often an open connection looks at its token (revocation ends the stream within about this
# plus the tokens file's reload period) and at whether a keep-alive is due.
TICK_S = 0.25
# Text messages are control messages ({"type": "end"}): anything longer is refused unread, so
# no parser ever sees a megabyte of nested brackets.
MAX_CONTROL_CHARS = 4096

Authorize = Callable[[], None]  # raises AudioError once the connection's token is no longer valid


def control(message: str) -> str:
    """The type of a text message, which must be ``{"type": "end"}``; AudioError (bad_message)
    for anything else: not JSON, too deep or too long to parse, another type."""
    if len(message) > MAX_CONTROL_CHARS:
        raise AudioError(
            "bad_message", f"a text message is a control message of at most {MAX_CONTROL_CHARS} characters"
        )
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise AudioError("bad_message", 'a text message must be the JSON object {"type": "end"}') from None
    if not isinstance(obj, dict) or obj.get("type") != "end":
        raise AudioError("bad_message", 'the only text message is {"type": "end"}; audio goes in binary messages')
    return "end"


class LiveStream:
    """Publishes one live connection's PCM as it arrives. ``authorized`` raises AudioError once the
    connection's token no longer admits it (revoked)."""

    def __init__(
        self,
        ingest: Ingest,
        ws: ServerConnection,
        q: dict,
        stream_id: str,
        tenant: str,
        authorized: Authorize,
        metadata: dict | None = None,
    ):
        self.ingest, self.settings, self.ws = ingest, ingest.settings, ws
        self.stream_id, self.authorized = stream_id, authorized
        try:
            rate = parse_count(q.get("sample_rate"), "sample_rate", TARGET_RATE, 0, 999_999_999)
            channels = parse_count(q.get("channels"), "channels", 1, 0, 999_999_999)
        except ValueError as e:  # the resampler says which rates and layouts it takes
            raise AudioError("bad_parameter", str(e)) from None
        self.resampler = PcmResampler(rate, channels)  # AudioError for a rate or layout it cannot take
        self.bytes_per_second = rate * channels * 2
        self.pub = StreamPublisher(
            ingest,
            stream_id,
            tenant,
            SourceInfo(f"raw/pcm_s16le@{rate}x{channels}", rate, channels),
            source_name=q.get("source"),
            language=q.get("language", AUTO),
            live=True,
            hotwords=q.get("hotwords"),
            metadata=metadata,
        )
        self.raw = SegmentWriter(
            ingest.store, self.pub.prefix + "source/", source_segment_bytes(self.settings, rate, channels), ".pcm"
        )
        self.pacer = Pacer(self.settings.live_pace_factor, self.settings.live_burst_seconds)

    async def run(self) -> StreamSummary | None:
        """The stream from StreamStart to StreamEnd; its summary when the client said end, None
        when it went away without (the stream then ends ABORTED). AudioError ends it ERROR."""
        # Everything that can block (archive PUTs, the producer's flush) runs in a worker thread,
        # one call at a time per connection so the stream stays in order: a slow store stalls its
        # own client, never the loop that serves every other one.
        await asyncio.to_thread(self.pub.start)
        status, reason = "ERROR", "ingest failed while serving the stream"
        try:
            await self.ws.send(json.dumps({"type": "ready", "stream_id": self.stream_id}))
            if await self._receive():
                return await asyncio.to_thread(self._complete)
            status, reason = "ABORTED", "client disconnected before end"
            return None
        except AudioError as e:
            status, reason = "ERROR", e.reason
            raise
        except ConnectionClosed as e:
            status, reason = "ABORTED", f"connection closed ({e.rcvd.code if e.rcvd else 'no close frame'})"
            return None
        finally:
            if not self.pub.finished:
                try:
                    await asyncio.to_thread(self._close, status, reason)
                except Exception:
                    log.exception("could not end the stream", extra=kv(stream_id=self.stream_id))

    async def _receive(self) -> bool:
        """Reads messages until the client says end (True) or closes without (False)."""
        keepalive_s = self.settings.idle_timeout_s / 3  # a pause keeps the stream open downstream
        now = time.monotonic()
        resume_at, last_record, last_auth = now, now, now
        while True:
            now = time.monotonic()
            if now - last_auth >= TICK_S:
                self.authorized()
                last_auth = now
            if now - last_record >= keepalive_s:
                await asyncio.to_thread(self.pub.keep_alive)
                last_record = now
            if now < resume_at:  # paced: the socket is not read, so the client's sends back up
                await asyncio.sleep(min(TICK_S, resume_at - now))
                continue
            try:
                message = await asyncio.wait_for(self.ws.recv(), TICK_S)  # cancelling recv is safe
            except TimeoutError:
                continue
            except ConnectionClosedOK:
                return False
            if isinstance(message, str):
                return control(message) == "end"
            hold = self.pacer.spend(len(message) / self.bytes_per_second)
            if self.pacer.lead() > self.pacer.burst:  # audio from the future: not a live client
                raise AudioError(
                    "too_fast",
                    f"live audio ran {self.pacer.lead():.0f} s ahead of the clock, more than the "
                    f"{self.pacer.burst:g} s allowed; send recordings with format=file",
                )
            await asyncio.to_thread(self._take, message)
            last_record = time.monotonic()
            resume_at = last_record + hold

    def _take(self, message: bytes) -> None:
        self.raw.write(message)
        self.pub.push(self.resampler.push(message))

    def _complete(self) -> StreamSummary:
        self.raw.close()
        self.pub.push(self.resampler.flush())
        return self.pub.finish()

    def _close(self, status: str, reason: str) -> None:
        try:
            self.raw.close()
        finally:
            self.pub.finish(status, reason)
