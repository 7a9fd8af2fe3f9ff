"""Fault injection for the tests: kills a run at an exact point, so that resume can be checked bitwise.

  RESNET_JAX_TEST_FAULT=kill@train:7 python tests/faults.py --config=... --workdir=...   (resnet_jax.main's flags)

runs `resnet_jax.main` with hooks installed from outside the package (monkeypatching the step factory and the
evaluation, and the checkpointer's temporary-path hook); the process sends itself a signal the first time it
reaches POINT at STEP. The package itself knows nothing of this.

  ACTION  kill (SIGKILL: no handler runs, like a lost machine), term (SIGTERM: a preemption notice), int (SIGINT)
  POINT   train       after the call of the step that reaches STEP (or passes it, with several steps per call),
                      before its log line, evaluation or checkpoint
          eval        at the start of the evaluation at STEP
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
  """Signals this process the first time it reaches the fault armed for `name` at or after `step` (a run of several
  steps per call passes some steps inside one call; once per process)."""
  target = armed(name)
  if target is not None and step >= target[1] and name not in _fired:
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


def install() -> None:
  """Arms the points named by the environment in resnet_jax's training run."""
  import jax
  import numpy as np
  from resnet_jax import checkpoint, train_loop, train_step
  if armed('train') is not None:
    make_step = train_step.make_train_step

    def make_train_step(*args, **kwargs):
      step_fn = make_step(*args, **kwargs)

      def step(state, *inputs):
        new = step_fn(state, *inputs)
        point('train', int(np.max(jax.device_get(new.step))))  # a state of several seeds: one step per seed
        return new
      step.lower = step_fn.lower  # the trainer compiles a step of several seeds ahead to check its memory
      return step
    train_step.make_train_step = make_train_step
  if armed('eval') is not None:
    evaluate_splits = train_loop.evaluate_splits

    def evaluate_with_fault(model, inp, state, step):
      point('eval', step)
      return evaluate_splits(model, inp, state, step)
    train_loop.evaluate_splits = evaluate_with_fault
  checkpoint.Checkpointer.temporary_path_class = temporary_path_class()


if __name__ == '__main__':
  from resnet_jax import cli, main
  install()
  cli.run(main.main, main.define_flags, workdir_help='Directory for metrics, checkpoints and plots.')

