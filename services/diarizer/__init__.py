"""diarizer: who spoke when (pyannote.audio + CAM++), as speaker turns onto hark.speakers."""
