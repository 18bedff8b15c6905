"""online_asr's declaration (hark/declaration.py): light, read by the library through its entry point."""

from hark.declaration import ServiceSpec
from hark.kafka import ONLINE_GROUP

SPEC = ServiceSpec(
    name="online_asr",
    main="services.online_asr.service",
    start=10,
    group=ONLINE_GROUP,  # ingest places streams by this group's assignment
    reads=("audio_topic",),
    # its PARTIALs go straight onto the results topic (a hop less for live captions)
    writes=("online_topic", "results_topic", "deadletter_topic"),
    produces=("OnlineTranscript", "Result", "DeadLetter"),
    transactional=ONLINE_GROUP + "-",
    pass_name="online",
    splits="audio_topic",
)
