"""The hark command line: the one package that composes the library and the services."""
