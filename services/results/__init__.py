"""results: merges everything known about a stream onto the one results topic consumers read."""
