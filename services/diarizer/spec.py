"""diarizer's declaration (hark/declaration.py): light, read by the library through its entry point."""

from hark.declaration import ServiceSpec

SPEC = ServiceSpec(
    name="diarizer",
    main="services.diarizer.service",
    start=30,
    group="hark-diarizer",
    reads=("audio_topic",),
    writes=("speakers_topic", "deadletter_topic"),
    produces=("SpeakerTurns", "DeadLetter"),
    transactional="hark-diarizer-",
    pass_name="diarizer",
    splits="audio_topic",
    min_replicas=0,
)
