"""Fault injection for the tests: stops, holds or starves a run at an exact point, so that resume can be checked bitwise.

  RESNET_JAX_TEST_FAULT=kill@train:7 python tests/faults.py --config=... --workdir=...   (resnet_jax.main's flags)

runs `resnet_jax.main` with hooks installed from outside the package (monkeypatching the step factory, the
evaluation, the metrics file and orbax's checkpoint manager, and the checkpointer's temporary-path hook); the action
happens the first time the run reaches POINT at (or past) STEP. The package itself knows nothing of this.

  ACTION  kill (SIGKILL: no handler runs, like a lost machine), term (SIGTERM: a preemption notice), int (SIGINT),
          pause (the process sleeps there for 10 minutes, holding its workdir),
          enospc (the write at POINT fails as on a full disk: checkpoint as orbax reports it, metrics as the OS does),
          bug (a ValueError raised at POINT, as a bug in our code or in a library would)
  POINT   train       after the call of the step that reaches STEP (or passes it, with several steps per call),
                      before its log line, evaluation or checkpoint
          eval        at the start of the evaluation at STEP
          checkpoint  inside the checkpoint write of STEP: the arrays are written to the temporary directory and
                      the commit (the rename to the final name) has not happened yet (enospc: orbax's save fails)
          metrics     the metrics line of STEP is written (enospc only)
"""
import errno
import os
import signal
import time

ENV = 'RESNET_JAX_TEST_FAULT'
ACTIONS = {'kill': signal.SIGKILL, 'term': signal.SIGTERM, 'int': signal.SIGINT, 'pause': None, 'enospc': None,
           'bug': None}
POINTS = ('train', 'eval', 'checkpoint', 'metrics')
# What orbax raised when a checkpoint write met a full disk (tensorstore's error, seen on a full tmpfs).
ORBAX_NO_SPACE = ('RESOURCE_EXHAUSTED: Error writing "params.head.kernel/0" in OCDBT database: Failed to write '
                  "329321 bytes to file 7: No space left on device [os_error_code='28']")


def _parse(spec: str):
  try:
    action, rest = spec.split('@')
    point, step = rest.split(':')
    step = int(step)
  except ValueError:
    raise ValueError(f'{ENV}={spec!r}: expected ACTION@POINT:STEP, e.g. kill@train:7') from None
  if action not in ACTIONS or point not in POINTS:
    raise ValueError(f'{ENV}={spec!r}: ACTION is one of {", ".join(ACTIONS)}; POINT one of {", ".join(POINTS)}.')
  return action, point, step


def armed(point: str):
  """The (action, step) armed for `point`, or None."""
  spec = os.environ.get(ENV)
  if not spec:
    return None
  action, p, step = _parse(spec)
  return (action, step) if p == point else None


_fired = set()


def reached(name: str, step: int, announce: bool = True) -> str | None:
  """The action armed for `name` the first time this process reaches `step` or passes it (None otherwise)."""
  target = armed(name)
  if target is None or step < target[1] or name in _fired:
    return None
  _fired.add(name)
  if announce:
    _announce(target[0], name, step)
  return target[0]


def _announce(action: str, name: str, step: int) -> None:
  print(f'[test fault] {action} at {name} at step {step}', flush=True)


# The run's checkpointers, so that a pause first lets their writes in flight finish: a paused run's workdir then
# stays as it is until the pause ends (orbax finishes a checkpoint in a background thread).
_checkpointers = []


def point(name: str, step: int) -> None:
  """Signals or pauses this process if a signal or pause is armed for `name` and reached at `step`."""
  action = reached(name, step, announce=False)
  if action == 'pause':
    for c in _checkpointers if name != 'checkpoint' else ():  # inside a write, that write cannot finish first
      c.manager.wait_until_finished()
    _announce(action, name, step)
    time.sleep(600)
  elif action in ('kill', 'term', 'int'):
    _announce(action, name, step)
    os.kill(os.getpid(), ACTIONS[action])
  elif action == 'bug':
    _announce(action, name, step)
    raise ValueError(f'an injected bug at {name} at step {step}')


def temporary_path_class():
  """For a signal at the 'checkpoint' point: an orbax temporary-path class that signals the process just before
  the commit of the armed step, after the arrays are written. None otherwise (orbax's default class)."""
  target = armed('checkpoint')
  if target is None or target[0] == 'enospc':
    return None
  # orbax's atomic-rename class is not exported publicly; a test-only hook may use it. If orbax moves it, this
  # import fails loudly and the test that arms the fault fails, rather than passing without a fault.
  from orbax.checkpoint._src.path import atomicity

  class SignalBeforeCommit(atomicity.AtomicRenameTemporaryPath):
    async def finalize(self, *args, **kwargs):
      name = self.get_final().name
      if name.isdigit():
        point('checkpoint', int(name))
      return await super().finalize(*args, **kwargs)

  return SignalBeforeCommit


def install() -> None:
  """Arms the points named by the environment in resnet_jax's training run."""
  import jax
  import numpy as np
  from resnet_jax import checkpoint, metrics_io, train, xla_workarounds
  if armed('train') is not None:
    call = xla_workarounds.StepCaller.__call__

    def call_with_fault(self, state, n, *inputs):
      new = call(self, state, n, *inputs)
      point('train', int(np.max(jax.device_get(new.step))))  # a state of several seeds: one step per seed
      return new
    xla_workarounds.StepCaller.__call__ = call_with_fault
  if armed('eval') is not None:
    evaluate_splits = train.evaluate_splits

    def evaluate_with_fault(model, inp, state, step):
      point('eval', step)
      return evaluate_splits(model, inp, state, step)
    train.evaluate_splits = evaluate_with_fault
  if armed('checkpoint') is not None and armed('checkpoint')[0] == 'enospc':
    save = checkpoint.ocp.CheckpointManager.save

    def save_on_a_full_disk(self, step, *args, **kwargs):
      if reached('checkpoint', step):
        raise ValueError(ORBAX_NO_SPACE)
      return save(self, step, *args, **kwargs)
    checkpoint.ocp.CheckpointManager.save = save_on_a_full_disk
  if armed('metrics') is not None:
    write = metrics_io.MetricsWriter.write

    def write_on_a_full_disk(self, step, metrics):
      if reached('metrics', step):  # the file cannot grow: the OS's error, raised where the line is written
        real_open = open

        def full_open(path, mode='r', *args, **kwargs):
          if 'a' in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
          return real_open(path, mode, *args, **kwargs)
        metrics_io.open = full_open
        try:
          return write(self, step, metrics)
        finally:
          del metrics_io.open
      return write(self, step, metrics)
    metrics_io.MetricsWriter.write = write_on_a_full_disk
  checkpoint.Checkpointer.temporary_path_class = temporary_path_class()
  init = checkpoint.Checkpointer.__init__

  def init_and_keep(self, *args, **kwargs):
    init(self, *args, **kwargs)
    _checkpointers.append(self)
  checkpoint.Checkpointer.__init__ = init_and_keep


if __name__ == '__main__':
  from resnet_jax import cli, main
  install()
  cli.run(main.main, main.define_flags, workdir_help='Directory for metrics, checkpoints and plots.')
