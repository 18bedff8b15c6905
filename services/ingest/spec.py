"""ingest's declaration (hark/declaration.py): light, read by the library through its entry point."""

from hark.declaration import ServiceSpec
from hark.kafka import ONLINE_GROUP

SPEC = ServiceSpec(
    name="ingest",
    main="services.ingest.server",
    start=0,
    # it also writes results: the tombstones of its retention sweep, which go to the stream's
    # tenant's published and produce topics too (hark/erasure.py)
    writes=("audio_topic", "results_topic", "deadletter_topic"),
    produces=("StreamStart", "AudioChunk", "StreamEnd", "StreamAlive", "DeadLetter"),
    # it reads what tenants' own producers publish, in its own group (services/ingest/kafka_source.py)
    groups=("hark-ingest-in",),
    # it places new streams by online_asr's assignment: it may describe that group (not join or read it)
    watches=(ONLINE_GROUP,),
    read_prefixes=("produce_topic",),
    write_prefixes=("published_topic", "produce_topic"),
    deploy_env=("HARK_INGEST_HOST", "HARK_INGEST_PORT", "HARK_CAPTIONS_PORT", "HARK_TOKENS_FILE"),
)
