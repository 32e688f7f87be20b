"""Pure decision logic: where each request runs (LOCAL, SPLIT, REMOTE) and why."""
