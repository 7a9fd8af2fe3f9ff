"""Every error class of the project: the mistakes a user can fix (a bad config, missing or damaged data, a workdir that
cannot hold the run), each raised where the project detects it.

Every command answers one of `USER_ERRORS` with one `error: ...` line and exit status 1, never a stack trace
(cli.py); anything else, a ValueError inside jax, optax or orbax included, is a bug and keeps its stack trace. Each
message says what to do.
"""
import contextlib


class ConfigError(ValueError):
  """A config value or a command-line flag the project cannot run with; the message lists the valid choices."""


class ConfigMismatchError(ConfigError):
  """A workdir's run (its config.json or checkpoint) differs from the config given."""


class DataError(ValueError):
  """The data is there but cannot serve the run (damaged, empty, or other data than the checkpoint's)."""


class CorruptImageError(DataError):
  """An image of the dataset cannot be decoded; the message names it."""


class MissingFileError(FileNotFoundError):
  """A file or folder the command needs is not there; the message says how to make it."""


class DatasetNotFoundError(RuntimeError):
  """The dataset is not where the config says; the message says how to get it."""


class CheckpointNotFoundError(MissingFileError):
  """There is no checkpoint where one is needed (evaluation, analysis)."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory is damaged."""


class DamagedCheckpointError(RuntimeError):
  """One checkpoint restores with other content than was saved (the newest intact one is used instead)."""


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or parameters."""


class WorkdirError(RuntimeError):
  """The workdir cannot hold this run: another run holds it, or a file in it cannot be read or written."""


class DamagedRecordError(WorkdirError):
  """A record of the run in the workdir (config.json, metrics.jsonl) cannot be read."""


@contextlib.contextmanager
def writing(path: str):
  """A failed write of `path` (a full disk, a read-only or failing device) as one WorkdirError that says what to do."""
  try:
    yield
  except OSError as e:
    raise WorkdirError(f'Could not write {path}: {e.strerror or e}. Free some space or fix the disk (or its '
                       'permissions), then run the same command; it resumes from the newest complete '
                       'checkpoint.') from e


USER_ERRORS = (ConfigError, DataError, MissingFileError, PermissionError, DatasetNotFoundError,
               NoUsableCheckpointError, NonFiniteLossError, WorkdirError)
