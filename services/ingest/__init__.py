"""ingest: files and live audio in, StreamStart/AudioChunk/StreamEnd on the audio topic, archive for replay."""
