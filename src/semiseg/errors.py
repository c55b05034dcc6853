"""User-facing errors: the CLI and the plugin show their message as one line, no traceback."""


class SemisegError(Exception):
    """A problem with the user's input or request, explained in its message."""


class InputError(SemisegError):
    """An input file, folder or value that cannot be used as it is."""


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise InputError with the message of the first failed (ok, message) check."""
    for ok, message in checks:
        if not ok:
            raise InputError(message)


class OutputExistsError(SemisegError):
    """An output would overwrite an existing file and overwriting was not asked for."""


class CheckpointError(SemisegError):
    """A checkpoint that is missing, corrupt, or not a semiseg checkpoint."""
