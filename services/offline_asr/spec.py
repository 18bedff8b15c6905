"""offline_asr's declaration (hark/declaration.py): light, read by the library through its entry point."""

from hark.declaration import ServiceSpec

SPEC = ServiceSpec(
    name="offline_asr",
    main="services.offline_asr.service",
    start=20,
    group="hark-offline-asr",
    reads=("audio_topic",),
    writes=("offline_topic", "deadletter_topic"),
    produces=("OfflineTranscript", "DeadLetter"),
    transactional="hark-offline-asr-",
    pass_name="offline",
    splits="audio_topic",
    min_replicas=0,
)
