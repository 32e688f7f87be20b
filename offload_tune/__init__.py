"""``offload-tune``: the CLI for whoever tunes a deployment (I/O lives here, decisions in partitioner/)."""
