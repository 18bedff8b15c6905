"""The one audio format every topic carries: 16 kHz, 16-bit little-endian, mono PCM.

Every service reads these names instead of writing the numbers; a chunk's time and size convert
through them."""

SAMPLE_RATE = 16000
BYTES_PER_SAMPLE = 2
BYTES_PER_SECOND = SAMPLE_RATE * BYTES_PER_SAMPLE
SAMPLES_PER_MS = SAMPLE_RATE // 1000
BYTES_PER_MS = SAMPLES_PER_MS * BYTES_PER_SAMPLE


def duration_s(pcm: bytes) -> float:
    return len(pcm) / BYTES_PER_SECOND
