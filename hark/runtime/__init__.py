"""What every hark service process shares: the consumer loop with its transactions, the stream
runner and its processor contract, dead letters, logging, metrics and health."""

from .consumer import ConsumerService, key_of
from .deadletters import DeadLetters, InputError, check_chunk
from .entry import main_for, service_settings
from .observe import HealthServer, JsonFormatter, Metrics, kv, setup_logging
from .processor import ERASED, NOTICES, REFUSED, Chunk, Output, Processors, StreamInfo, StreamProcessor
from .streams import RecentIds, SequenceCheck, StreamRunner

__all__ = [
    "ERASED",
    "NOTICES",
    "REFUSED",
    "Chunk",
    "ConsumerService",
    "DeadLetters",
    "HealthServer",
    "InputError",
    "JsonFormatter",
    "Metrics",
    "Output",
    "Processors",
    "RecentIds",
    "SequenceCheck",
    "StreamInfo",
    "StreamProcessor",
    "StreamRunner",
    "check_chunk",
    "key_of",
    "kv",
    "main_for",
    "service_settings",
    "setup_logging",
]
