"""The mistakes a user can fix: a bad config, missing or damaged data, a workdir that cannot hold the run.

Every command answers one of `USER_ERRORS` with one `error: ...` line and exit status 1, never a stack trace
(cli.py); anything else is a bug and keeps its stack trace. Each message says what to do.
"""
import contextlib


class DatasetNotFoundError(RuntimeError):
  """The dataset is not where the config says; the message says how to get it."""


class CorruptImageError(ValueError):
  """An image of the dataset cannot be decoded; the message names it."""


class ConfigMismatchError(ValueError):
  """A workdir's run (its config.json or checkpoint) differs from the config given."""


class CheckpointNotFoundError(FileNotFoundError):
  """There is no checkpoint where one is needed (evaluation, analysis)."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory is damaged."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or parameters."""


class WorkdirError(RuntimeError):
  """The workdir cannot hold this run: another run holds it, or a file in it cannot be read or written."""


@contextlib.contextmanager
def writing(path: str):
  """A failed write of `path` (a full disk, a read-only or failing device) as one WorkdirError that says what to do."""
  try:
    yield
  except OSError as e:
    raise WorkdirError(f'Could not write {path}: {e.strerror or e}. Free some space or fix the disk (or its '
                       'permissions), then run the same command; it resumes from the newest complete '
                       'checkpoint.') from e


USER_ERRORS = (ValueError, PermissionError, DatasetNotFoundError, CheckpointNotFoundError, NoUsableCheckpointError,
               NonFiniteLossError, WorkdirError)
