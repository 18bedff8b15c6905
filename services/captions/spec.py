"""captions' declaration (hark/declaration.py): light, read by the library through its entry point."""

from hark.declaration import ServiceSpec

SPEC = ServiceSpec(
    name="captions",
    main="services.captions.app",
    start=50,
    # it reads every results partition itself (assigned, no group commits): its tails' groups only
    reads=("results_topic",),
    writes=("deadletter_topic",),
    produces=("DeadLetter",),
    groups=("hark-tail-",),
    min_replicas=0,
    deploy_env=("HARK_CAPTIONS_HOST", "HARK_CAPTIONS_PORT", "HARK_INGEST_PORT", "HARK_INDEX_PATH", "HARK_TOKENS_FILE"),
)
