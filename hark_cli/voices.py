"""`hark speakers enroll|list|remove`: a tenant's named voices (see hark/voices.py)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import numpy as np

from hark.audio import AudioError, DecodedAudio
from hark.voices import VoiceError, VoiceStore, check_name

from .common import settings_of

MAX_RECORDING_S = 600  # a voiceprint needs seconds of speech; longer files are refused, not held in memory


def add_parser(sub) -> None:
    sp = sub.add_parser("speakers", help="named voices: enroll a voiceprint, list or remove (erase) them")
    sp.add_argument("action", choices=["enroll", "list", "remove"])
    sp.add_argument("name", nargs="?", help="enroll, remove: the speaker's name, e.g. Alice")
    sp.add_argument("files", nargs="*", help="enroll: recordings of that one voice, 5 s of speech or more in all")
    sp.add_argument("--tenant", default="default", help="whose voice it is; never seen by another tenant")
    sp.add_argument("--json", action="store_true", help="list: JSON lines")
    sp.set_defaults(fn=cmd_speakers)


def cmd_speakers(a) -> int:
    s = settings_of(a)
    store = VoiceStore(s)
    try:
        if a.action == "list":
            for v in store.load(a.tenant):
                if a.json:
                    print(json.dumps(v.public()))
                else:
                    when = datetime.fromtimestamp(v.enrolled_at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
                    print(f"{v.name}\t{v.speech_s:.0f} s of speech\tenrolled {when} UTC")
            return 0
        if not a.name:
            raise VoiceError(f"`hark speakers {a.action}` needs a NAME")
        if a.action == "remove":
            for entry in store.remove(a.tenant, a.name):
                print(json.dumps(entry))
            return 0
        if not a.files:
            raise VoiceError("`hark speakers enroll NAME FILE...` needs at least one recording")
        return _enroll(a, store)
    except VoiceError as e:
        print(f"hark: {e}", file=sys.stderr)
        return 1


def _enroll(a, store: VoiceStore) -> int:
    import torch

    from services.diarizer.pipeline import MODEL_NAME, Diarizer
    from services.diarizer.voices import voiceprint

    check_name(a.name)  # before minutes of model work, not after
    recordings = []
    for f in a.files:
        try:
            pcm = b"".join(DecodedAudio(f, max_seconds=MAX_RECORDING_S).blocks())
            recordings.append((f, np.frombuffer(pcm, dtype="<i2")))
        except (AudioError, OSError) as e:
            raise VoiceError(f"{f}: {e}") from None
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    s = store.settings
    vector, speech_s = voiceprint(Diarizer(), recordings, s.voice_match_threshold, s.diarizer_link_threshold)
    voice = store.enroll(a.tenant, a.name, vector, speech_s, MODEL_NAME)
    print(json.dumps(voice.public()))
    print(f"hark: {a.name} enrolled for tenant {a.tenant} from {speech_s:.1f} s of speech", file=sys.stderr)
    return 0
