"""What every launch script shares: one-line errors instead of tracebacks, and all-or-nothing output folders."""
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from absl import app, flags, logging

from factrecall_jax import errors

# Errors a user causes (bad config, bad path, bad checkpoint), raised where input is checked (errors.py); anything
# else, a builtin ValueError from a library included, is a bug and keeps its traceback.
USER_ERRORS = (errors.UserError,)


def _fail(message):
    # One line even when the message quotes a multi-line library error (hub downloads, tokenizer loading).
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    logging.flush()
    sys.exit(2)


def run(main):
    """Wraps an absl `main(argv)`: a user error prints `error: ...` on one line and exits with status 2.

    Library logs below ERROR (orbax logs every checkpoint operation) are hidden unless --verbosity is given;
    progress is printed.
    """

    def wrapped(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.ERROR)
        if len(argv) > 1:
            _fail(f"unexpected arguments: {' '.join(argv[1:])} (every option is a --flag)")
        try:
            return main(argv)
        except USER_ERRORS as e:
            _fail(e)

    return wrapped


def parse_flags(argv):
    """absl's parser, plus one line instead of a traceback for an override of a config field that does not exist.

    absl reports bad flag values itself; ml_collections raises AttributeError or KeyError for an unknown field.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(message))
            e = e.args[0]
        _fail(f"no such config field: {' '.join(str(e.args[0] if e.args else e).split())}")


def launch(main):
    """The entry point of a launch script: absl flags, config-field errors and user errors as one line each."""
    app.run(run(main), flags_parser=parse_flags)


@contextlib.contextmanager
def atomic_output_dir(path, overwrite=False):
    """Yields a temporary folder beside `path` that becomes `path` only if the block finishes.

    A crash or an error leaves nothing at `path`, so a half-written output is never mistaken for a result.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise errors.PathExists(f"{path} already exists; choose another folder, remove it, or pass --overwrite")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def atomic_write(path: str, content: str | Callable[[str], None]) -> None:
    """Writes the file `path` whole or not at all: into `path`.tmp, then renamed over `path`. `content` is UTF-8
    text, or a function that writes the file it is given (safetensors, JSON of any size)."""
    tmp = f"{path}.tmp"
    try:
        if isinstance(content, str):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)
        else:
            content(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
