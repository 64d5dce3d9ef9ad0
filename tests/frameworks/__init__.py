"""The frameworks' own test suites, adapted to convstate's adapters (see each file's header)."""
