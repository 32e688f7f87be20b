"""The cloud node: hosts models, runs suffixes and whole requests for edge agents."""
