"""hark: Kafka-native speech recognition. This package is the thin library the services share."""

__version__ = "0.1.0"
