"""results' declaration (hark/declaration.py): light, read by the library through its entry point."""

from hark.declaration import ServiceSpec

SPEC = ServiceSpec(
    name="results",
    main="services.results.service",
    start=40,
    group="hark-results",
    reads=("online_topic", "offline_topic", "speakers_topic"),
    writes=("results_topic", "deadletter_topic"),
    produces=("Result", "DeadLetter"),
    transactional="hark-results-",
    splits="online_topic",
    # each tenant's published tier (made by `hark clients create`), and the empty-keyed nudge that
    # lets compaction reach a quiet partition of a tenant's published or produce topic
    # (hark/published.py: Nudges)
    write_prefixes=("published_topic", "produce_topic"),
)
