"""Test-only fault injection: lets tests kill a run at an exact point, so that resume can be checked bitwise.

Set RESNET_JAX_TEST_FAULT=ACTION@POINT:STEP in the environment of a run; the process then sends itself a signal
the first time it reaches POINT at STEP. Nothing happens when the variable is unset, which is always the case
outside tests/test_reliability.py.

  ACTION  kill (SIGKILL: no handler runs, like a lost machine), term (SIGTERM: a preemption notice), int (SIGINT)
  POINT   train       after the update of STEP is dispatched, before its log line, evaluation or checkpoint
          eval        during the evaluation at STEP, while the first split's evaluation is in flight
          checkpoint  inside the checkpoint write of STEP: the arrays are written to the temporary directory and
                      the commit (the rename to the final name) has not happened yet
"""
import os
import signal

ENV = 'RESNET_JAX_TEST_FAULT'
ACTIONS = {'kill': signal.SIGKILL, 'term': signal.SIGTERM, 'int': signal.SIGINT}
POINTS = ('train', 'eval', 'checkpoint')


def _parse(spec: str):
  try:
    action, rest = spec.split('@')
    point, step = rest.split(':')
    step = int(step)
  except ValueError:
    raise ValueError(f'{ENV}={spec!r}: expected ACTION@POINT:STEP, e.g. kill@train:7') from None
  if action not in ACTIONS or point not in POINTS:
    raise ValueError(f'{ENV}={spec!r}: ACTION is one of {", ".join(ACTIONS)}; POINT one of {", ".join(POINTS)}.')
  return ACTIONS[action], point, step


def armed(point: str):
  """The (signal, step) armed for `point`, or None."""
  spec = os.environ.get(ENV)
  if not spec:
    return None
  sig, p, step = _parse(spec)
  return (sig, step) if p == point else None


_fired = set()


def point(name: str, step: int) -> None:
  """Signals this process if the fault armed for `name` is at `step` (once per process)."""
  target = armed(name)
  if target is not None and target[1] == step and name not in _fired:
    _fired.add(name)
    print(f'[test fault] {name} at step {step}: sending signal {target[0]}', flush=True)
    os.kill(os.getpid(), target[0])


def temporary_path_class():
  """For the 'checkpoint' point: an orbax temporary-path class that signals the process just before the commit of
  the armed step, after the arrays are written. None when no checkpoint fault is armed (orbax's default class)."""
  if armed('checkpoint') is None:
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
