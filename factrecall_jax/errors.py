"""The errors a user causes (a bad config value or flag, a missing folder, an output that exists): types of their own.

Launch scripts print a `UserError` as one `error: ...` line and exit with status 2 (`cli.run`); any other exception
is a bug and keeps its traceback, even a ValueError from deep inside a library. Each subclass is also the builtin the
check raised before, so callers that catch ValueError or FileNotFoundError keep working.
"""


class UserError(Exception):
    """A problem with what the user asked for, raised where the input is checked; the message says what is valid."""


class InvalidValue(UserError, ValueError):
    """A config value, flag or input file (checkpoint, trace, tokenizer) that cannot be used."""


class MissingPath(UserError, FileNotFoundError):
    """A folder or file the user named that does not exist, or lacks what it should hold."""


class PathExists(UserError, FileExistsError):
    """An output that exists already and is not to be replaced."""


class MissingPackage(UserError, ImportError):
    """An optional package a function needs (e.g. gguf to convert a GGUF file) is not installed."""
