"""offline_asr: full-context Whisper re-decoding of every stream, more accurate than the online pass."""
