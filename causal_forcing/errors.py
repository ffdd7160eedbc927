"""Exceptions with one-line, user-facing messages.

Library code raises these for bad *input* (files, configs, arguments). The CLI turns them into a one-line
message on stderr and exit code 2; programming errors stay ordinary exceptions with tracebacks.
"""


class CausalForcingError(Exception):
    """Base class of every user-facing error of this package."""


class ConfigError(CausalForcingError, ValueError):
    """An invalid, unknown or mistyped configuration value."""


class CheckpointError(CausalForcingError):
    """A missing, corrupt, truncated or mismatched checkpoint / weight file."""


class InputError(CausalForcingError, ValueError):
    """Bad user input other than configs and checkpoints (images, prompts, frame counts, ...)."""
