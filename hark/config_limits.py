"""What each setting accepts: the range of every number and the choices of every enumerated
setting (hark/config.py checks them when settings load; docs/configuration.md shows them)."""

# The range of every number (inclusive): anything outside is refused when settings load, naming
# the variable, instead of surfacing later as a hung stream or a broker error.
RANGES: dict[str, tuple[float, float]] = {
    "partitions": (1, 1024),
    "replication_factor": (1, 16),
    "topic_retention_hours": (0.01, 87600),
    "audio_retention_mb": (0, 10_000_000),
    "published_compaction_lag_s": (1, 30 * 86400),
    "published_topics_s": (0.5, 3600),
    "produce_compaction_lag_s": (60, 30 * 86400),
    "archive_retention_days": (0, 36500),
    "chunk_ms": (20, 2000),
    "audio_linger_ms": (0, 1000),
    "output_linger_ms": (0, 1000),
    "max_upload_bytes": (1024, 1 << 34),
    "max_stream_seconds": (1, 7 * 86400),
    "max_ws_message_bytes": (1024, 64 << 20),
    "ingest_port": (0, 65535),
    "captions_port": (0, 65535),
    "health_port": (0, 65535),
    "archive_segment_seconds": (1, 600),
    "ingest_buffer_bytes": (64 * 1024, 256 << 20),
    "ingest_max_streams": (0, 100_000),
    "tenant_max_streams": (0, 100_000),
    "tenant_audio_seconds_per_hour": (0, 1e9),
    "ingest_max_connections": (1, 100_000),
    "tenant_max_connections": (0, 100_000),
    "max_upload_seconds": (1, 7 * 86400),
    "upload_idle_timeout_s": (1, 86400),
    "ingest_upload_workers": (1, 64),
    "ingest_upload_nice": (0, 19),
    "live_pace_factor": (1, 1000),
    "live_burst_seconds": (0, 3600),
    "partial_interval_ms": (0, 10_000),
    "idle_timeout_s": (1, 86400),
    "max_streams": (1, 4096),
    "prewarm_decoders": (0, 4096),
    "nbest": (1, 20),
    "online_max_hmm_per_frame": (100, 100_000),
    "offline_cpu_threads": (0, 256),
    "offline_beam_size": (1, 20),
    "offline_nbest": (0, 20),
    "offline_prompt_chars": (0, 2000),
    "offline_min_window_s": (1, 30),
    "offline_max_window_s": (1, 30),  # Whisper's encoder window
    "offline_provisional_s": (0, 30),
    "offline_draft_max_streams": (0, 1000),
    "offline_draft_batch": (1, 64),
    "offline_draft_context_s": (0, 30),
    "offline_encode_pad_s": (0, 30),
    "offline_nice": (0, 19),
    "offline_draft_nice": (0, 19),
    "offline_candidate_fraction": (0, 1),
    "diarizer_block_s": (1, 60),
    "diarizer_context_s": (0, 30),
    "diarizer_link_threshold": (0, 1),  # cosine similarity
    "diarizer_cluster_threshold": (0, 2),  # cosine distance
    "diarizer_merge_threshold": (0, 1),
    "diarizer_min_speaker_s": (0, 600),
    "diarizer_threads": (1, 256),
    "diarizer_nice": (0, 19),
    "voice_match_threshold": (0, 1),  # cosine similarity
    "voice_live_min_s": (0, 600),
    "voiceprint_retention_days": (0, 36500),
    "max_transcript_words": (100, 10_000_000),
    "offline_timeout_s": (1, 86400),
    "commit_interval_s": (0.01, 60),
    "transaction_timeout_s": (1, 900),  # the broker's transaction.max.timeout.ms is 15 minutes
    "session_timeout_s": (6, 1800),  # the broker's group.{min,max}.session.timeout.ms
}
CHOICES: dict[str, tuple[str, ...]] = {
    "audio_placement": ("balanced", "hash"),
    "offline_device": ("auto", "cpu", "cuda"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}
