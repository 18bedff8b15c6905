"""Named voices: a tenant's enrolled voiceprints (the diarizer's speaker embedding), kept sealed.

A voiceprint is biometric data, so it is kept like a stream's audio: every voiceprint has its own
data key in the keyring (``voice-<random>``) and is stored sealed with it in the archive store
under ``voices/<tenant hash>/<key id>``. Neither the object's name nor anything outside the sealed
payload says whose voice it is. Removing a voice deletes its key first, so any copy of the object
(a bucket replica, a backup) is unreadable from then on. Voiceprints older than
``voiceprint_retention_days`` are erased by ``hark retention`` and never used once expired.

A tenant only ever lists, matches or removes voices under its own prefix: the diarizer loads the
voices of the stream's tenant and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import records
from .config import Settings
from .erasure import audit
from .keys import KeyMissing, Keyring, SealError, StreamErased
from .storage import ObjectStore, open_store
from .tenants import check_tenant

log = logging.getLogger("hark.voices")

NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9 ._'-]{0,46}[A-Za-z0-9.]|[A-Za-z]")
ANONYMOUS_RE = re.compile(r"SPEAKER_\d+")  # the diarizer's own labels: never a name
MAX_VOICES = 100  # per tenant: every stream of the tenant compares its speakers with all of them


class VoiceError(ValueError):
    """A voice that cannot be enrolled, found or removed; the message says why."""


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or "") or "  " in name:
        raise VoiceError(
            f"invalid voice name {name!r}: 1-48 characters, letters, digits, spaces and . _ ' -, starting with a letter"
        )
    if ANONYMOUS_RE.fullmatch(name):
        raise VoiceError(f"{name!r} looks like an anonymous speaker label: choose a person's name")
    return name


@dataclass
class Voice:
    name: str
    tenant: str
    vector: np.ndarray  # unit length
    speech_s: float
    enrolled_at_ms: int
    model: str
    key_id: str = ""

    def public(self) -> dict:
        """What listing shows: never the vector."""
        return {
            "name": self.name,
            "tenant": self.tenant,
            "speech_s": round(self.speech_s, 1),
            "enrolled_at_ms": self.enrolled_at_ms,
            "model": self.model,
        }


def _prefix(tenant: str) -> str:
    # a hash, not the tenant's name: the store's listing tells nobody which tenants enrolled voices
    return "voices/" + hashlib.sha256(b"hark-voices\0" + check_tenant(tenant).encode()).hexdigest()[:32] + "/"


class VoiceStore:
    def __init__(self, settings: Settings, store: ObjectStore | None = None, keys: Keyring | None = None):
        self.settings = settings
        self.store = store or open_store(settings)
        self.keys = keys or Keyring.for_settings(settings)

    def enroll(self, tenant: str, name: str, vector: np.ndarray, speech_s: float, model: str) -> Voice:
        """Store the voiceprint; an earlier one of the same name in the tenant is replaced (erased)."""
        check_name(name)
        existing = self.load(tenant)
        if len([v for v in existing if v.name != name]) >= MAX_VOICES:
            raise VoiceError(f"tenant {tenant!r} has {MAX_VOICES} voices, the most it may keep: remove one first")
        vec = np.asarray(vector, dtype=np.float64)
        vec = vec / max(float(np.linalg.norm(vec)), 1e-9)
        voice = Voice(name, tenant, vec.astype(np.float32), speech_s, records.now_ms(), model)
        voice.key_id = "voice-" + secrets.token_hex(16)
        self.keys.create(voice.key_id)
        body = json.dumps({**voice.public(), "vector": [round(float(x), 6) for x in voice.vector]}).encode()
        obj = _prefix(tenant) + voice.key_id
        self.store.put(obj, self.keys.seal(voice.key_id, body, obj.encode()))
        for old in existing:
            if old.name == name:
                self._erase(old, "replaced by a new enrollment")
        return voice

    def load(self, tenant: str, now_ms: int | None = None) -> list[Voice]:
        """The tenant's voices, oldest first; expired ones are left out (``hark retention`` erases them)."""
        out = []
        for voice in self._all(tenant):
            if not self._expired(voice, now_ms):
                out.append(voice)
        return sorted(out, key=lambda v: (v.enrolled_at_ms, v.name))

    def remove(self, tenant: str, name: str, reason: str = "request") -> list[dict]:
        found = [v for v in self._all(tenant) if v.name == name]
        if not found:
            raise VoiceError(f"tenant {tenant!r} has no voice named {name!r}")
        return [self._erase(v, reason) for v in found]

    def sweep(self, now_ms: int | None = None) -> list[dict]:
        """Erase every tenant's voiceprints older than the retention period (0: keep forever)."""
        out = []
        for key in self.store.list("voices/"):
            voice = self._read(key, tenant=None)
            if voice is not None and self._expired(voice, now_ms):
                out.append(self._erase(voice, f"retention {self.settings.voiceprint_retention_days:g} days"))
        return out

    # -- internals ----------------------------------------------------------------------------------
    def _expired(self, voice: Voice, now_ms: int | None) -> bool:
        days = self.settings.voiceprint_retention_days
        return days > 0 and voice.enrolled_at_ms < (now_ms or records.now_ms()) - days * 86_400_000

    def _all(self, tenant: str) -> list[Voice]:
        voices = []
        for key in self.store.list(_prefix(tenant)):
            voice = self._read(key, tenant)
            if voice is not None:
                voices.append(voice)
        return voices

    def _read(self, obj: str, tenant: str | None) -> Voice | None:
        key_id = obj.rsplit("/", 1)[-1]
        try:
            d = json.loads(self.keys.open(key_id, self.store.get(obj), obj.encode()))
        except (KeyError, KeyMissing, StreamErased):  # removed while listed, or its key is gone
            return None
        except (SealError, ValueError) as e:
            log.warning("voiceprint unreadable", extra={"fields": {"object": obj, "error": str(e)}})
            return None
        if tenant is not None and d["tenant"] != tenant:  # sealed with its tenant: never another's
            return None
        return Voice(
            d["name"],
            d["tenant"],
            np.asarray(d["vector"], dtype=np.float32),
            d["speech_s"],
            d["enrolled_at_ms"],
            d["model"],
            key_id,
        )

    def _erase(self, voice: Voice, reason: str) -> dict:
        key_deleted = self.keys.erase(voice.key_id)  # every copy of the object is unreadable from here
        self.store.delete(_prefix(voice.tenant) + voice.key_id)
        entry = {
            "kind": "voice",  # beside the streams' erasures in the same audit log
            "voice": voice.key_id,
            "tenant": voice.tenant,
            "reason": reason,
            "erased_at_ms": records.now_ms(),
            "key_deleted": key_deleted,
        }
        audit(self.settings, entry)
        log.info("voiceprint erased", extra={"fields": entry})
        return entry


class TenantVoices:
    """The diarizer's view: a tenant's voices, read again at most every ``ttl_s`` (a removal or a
    new enrollment reaches streams opened after that)."""

    def __init__(self, store: VoiceStore, ttl_s: float = 2.0, tenants: int = 256):
        self.store, self.ttl_s, self.max_tenants = store, ttl_s, tenants
        self._cache: dict[str, tuple[float, list[Voice]]] = {}
        self._lock = threading.Lock()

    def __call__(self, tenant: str) -> list[Voice]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tenant)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        voices = self.store.load(tenant)
        with self._lock:
            if len(self._cache) >= self.max_tenants:
                self._cache.clear()
            self._cache[tenant] = (now, voices)
        return voices
