"""What every hark service process shares: the consumer loop with its transactions and
checkpoints, the stream runner and its processor contract, dead letters, logging, metrics and
health. ``hark.runtime.testing`` runs them without a broker (tests only)."""

from .checkpoints import Checkpoints
from .consumer import Clients, ConsumerService, KafkaClients, key_of
from .deadletters import DeadLetters, InputError, check_chunk
from .entry import main_for, service_settings
from .observe import HealthServer, JsonFormatter, Metrics, kv, setup_logging
from .processor import ERASED, NOTICES, REFUSED, Chunk, Output, Processors, StreamInfo, StreamProcessor
from .streams import RecentIds, SequenceCheck, StreamRunner

__all__ = [
    "ERASED",
    "NOTICES",
    "REFUSED",
    "Checkpoints",
    "Chunk",
    "Clients",
    "ConsumerService",
    "DeadLetters",
    "HealthServer",
    "InputError",
    "JsonFormatter",
    "KafkaClients",
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
