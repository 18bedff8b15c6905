"""activity: voice activity (where someone speaks) of every stream, as speaker turns onto hark.activity.

A worked example of a new consumer of the audio topic: a Processors (service.py), its declaration
(spec.py) and one entry-point line in pyproject.toml. Opt-in: `hark up --with activity`.
"""
