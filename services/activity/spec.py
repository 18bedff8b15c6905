"""activity's declaration (hark/declaration.py): light, read by the library through its entry point."""

from hark.declaration import ServiceSpec

SPEC = ServiceSpec(
    name="activity",
    main="services.activity.service",
    group="hark-activity",
    reads=("audio_topic",),
    writes=("activity", "deadletter_topic"),  # "activity": a topic of its own, <HARK_TOPIC_PREFIX>activity
    produces=("SpeakerTurns", "DeadLetter"),  # the turns of one speaker, SPEECH
    transactional="hark-activity-",
    splits="audio_topic",
    default=False,  # opt-in: `hark up --with activity`
)
