"""captions: live captions page, search over 1-best and n-best words, standard exports."""
