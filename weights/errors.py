"""The one error type a user's broken or missing checkpoint produces."""


class CheckpointError(Exception):
    """A checkpoint cannot be used: missing or broken file, bad config, wrong tensors. The message names the file."""
