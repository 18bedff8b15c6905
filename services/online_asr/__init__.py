"""online_asr: low-latency streaming recognition (pocketsphinx) of every stream on the audio topic."""
