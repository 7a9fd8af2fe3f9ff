"""Checkpoints with orbax-checkpoint under WORKDIR/checkpoints.

Completeness: orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after every
file is written, so a run killed mid-write never leaves a checkpoint that looks finished; leftover temporary
directories are removed when the next run opens the directory.

Integrity: orbax does not notice a flipped byte in array data (zstd chunks carry no checksum: such a checkpoint
restores silently with wrong values). Each save therefore records the SHA-256 of the whole state in the step's
metadata, and a restore recomputes it. Resuming takes the newest checkpoint that restores and matches its digest;
newer damaged ones are reported and moved to WORKDIR/checkpoints_damaged/ (kept for inspection, never deleted).

The input's record: the input's iterator state (a small JSON dict: the data's identity, and a stream's position) is
saved as the item 'data_iter' of the same step, next to the state (item 'default'), so the step and what it was
trained on are always one consistent pair.

The run's config is recorded beside the checkpoints, in WORKDIR/config.json (run_record.py).
"""
import contextlib
import hashlib
import os
import re
import shutil

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax import distributed, models, train_step
from resnet_jax.errors import (CheckpointNotFoundError, ConfigMismatchError, DamagedCheckpointError,
                               NoUsableCheckpointError, WorkdirError)

DIGEST_KEY = 'state_sha256'
STATE_ITEM, DATA_ITEM = 'default', 'data_iter'  # orbax item names; 'default' is also a single-item checkpoint's


def state_digest(tree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (on the host)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def storage_failure(e: BaseException) -> str | None:
  """What went wrong, when `e` is a failed write to storage (a full disk, a read-only or failing device, missing
  permission), in a few words; None for any other error. orbax reports tensorstore's errors as ValueError with the
  OS error code in the text."""
  if isinstance(e, OSError) and e.errno:
    return e.strerror or os.strerror(e.errno)
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  for status in ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED', 'No space left on device', 'Read-only file system'):
    if status in text:
      return status
  return None


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:limit] if text else ""}'


class Checkpointer:
  # orbax's class for the temporary directory a step is written into before its atomic rename; None is orbax's
  # default. A hook for tests that stop a run in the middle of a write.
  temporary_path_class = None

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.damaged_directory = os.path.join(self.workdir, 'checkpoints_damaged')
    options = dict(preservation_policy=ocp.checkpoint_managers.LatestN(n=keep), create=True,
                   cleanup_tmp_directories=True)
    if self.temporary_path_class is not None:  # orbax has deprecated this option; only the tests' hook sets it
      options['temporary_path_class'] = self.temporary_path_class
    # The handlers are given per item, not as orbax's newer `handler_registry`: our state item is named 'default',
    # orbax's name for the item of a single-item checkpoint, and with a registry orbax decides between single- and
    # multi-item from whether a step has a 'default' directory, so it would take each of our steps for a
    # single-item one and hide 'data_iter'. A dict of handlers declares several items from the start, and having
    # them before any restore lets metadata reads work first.
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(**options))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state, force: bool = False, data_state: dict | None = None) -> None:
    """Saves `state` (and `data_state`, the input's record after this step). A write that cannot be made (a full
    disk, a read-only or failing device) raises WorkdirError, naming the step and the newest complete checkpoint;
    a disk without room for the state is refused before anything of the step is written."""
    step = int(np.max(jax.device_get(state.step)))  # several seeds: one step counter each, all equal
    if step in self.manager.all_steps():
      return
    tree = flax.serialization.to_state_dict(state)
    state_bytes = sum(np.dtype(a.dtype).itemsize * int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(tree))
    needed = state_bytes + state_bytes // 8 + (1 << 20)  # the arrays, orbax's index and metadata, and some slack
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      self.wait()
      raise self._write_error(step, f'about {needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free')
    items = {STATE_ITEM: ocp.args.StandardSave(tree)}
    if data_state is not None:
      items[DATA_ITEM] = ocp.args.JsonSave(data_state)
    # The digest is taken now, from the state being saved; the write itself continues in the background.
    with self._storage_errors(step):
      self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                        custom_metadata={DIGEST_KEY: state_digest(tree)})

  def _write_error(self, step, reason: str) -> WorkdirError:
    try:
      latest = self.manager.latest_step()
    except Exception:  # the manager is in no state to say
      latest = None
    return WorkdirError(
        f'Could not write {"checkpoint step " + str(step) if step is not None else "a checkpoint"} in '
        f'{self.directory}: {reason}. The newest complete checkpoint is '
        f'{"step " + str(latest) if latest is not None else "none"}: free some space or fix the disk (or its '
        'permissions), then run the same command; it resumes from there.')

  @contextlib.contextmanager
  def _storage_errors(self, step=None):
    """A failed write inside (orbax raises those of a background write at the next save or wait) as WorkdirError."""
    try:
      yield
    except Exception as e:
      reason = storage_failure(e)
      if reason is None:
        raise
      raise self._write_error(step, reason) from e

  def data_state(self, step: int) -> dict | None:
    """The input's iterator state saved with `step`, or None (an input without one, or an older checkpoint)."""
    if DATA_ITEM not in self._items(step):
      return None
    return self.manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: ocp.args.JsonRestore()}))[DATA_ITEM]

  def _items(self, step: int) -> list:
    return list(self.manager.metadata(step).item_metadata.keys())

  def _state_metadata(self, step: int):
    meta = self.manager.metadata(step).item_metadata[STATE_ITEM]
    return getattr(meta, 'tree', meta)

  def saved_digest(self, step: int) -> str | None:
    try:
      meta = self.manager.metadata(step).custom_metadata or {}
    except Exception:  # an unreadable step metadata file: the digest is unknown
      return None
    return meta.get(DIGEST_KEY)

  def check_fits(self, template, step: int) -> None:
    """Raises ConfigMismatchError naming the arrays whose shape or dtype differ between `step` and `template`."""
    meta = self._state_metadata(step)
    saved = {jax.tree_util.keystr(p): (tuple(m.shape), np.dtype(m.dtype).name)
             for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
    wanted = {jax.tree_util.keystr(p): (tuple(np.shape(x)), np.dtype(x.dtype).name)
              for p, x in jax.tree_util.tree_flatten_with_path(flax.serialization.to_state_dict(template))[0]}
    diffs = [f'  {k}: checkpoint {saved.get(k, "<absent>")}, this run {wanted.get(k, "<absent>")}'
             for k in sorted(set(saved) | set(wanted), key=lambda k: (not k.startswith("['params']"), k))
             if saved.get(k) != wanted.get(k)]
    if diffs:
      more = f'\n  ... and {len(diffs) - 10} more' if len(diffs) > 10 else ''
      raise ConfigMismatchError(
          f'The checkpoint at step {step} in {self.directory} does not fit this run\'s model (shape, dtype):\n'
          + '\n'.join(diffs[:10]) + more + '\nResume with the config it was written with, or use another --workdir.')

  def restore(self, template, step: int | None = None):
    """Restores `step` (default: the latest) into the structure and shardings of `template`, and checks it against
    the digest recorded at save time. Raises ConfigMismatchError if it does not fit the template,
    DamagedCheckpointError if it restores with different content, or orbax's error if it cannot be read."""
    step = self.latest_step() if step is None else step
    self.check_fits(template, step)
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        flax.serialization.to_state_dict(template))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]
    expected = self.saved_digest(step)
    if expected is not None and state_digest(restored) != expected:
      raise DamagedCheckpointError(f'its content does not match the SHA-256 recorded when step {step} was saved')
    return flax.serialization.from_state_dict(template, restored)

  def load_arrays(self, step: int | None = None) -> dict:
    """The state dict of `step` (default: the latest) as host numpy arrays, on any device count; not verified."""
    step = self.latest_step() if step is None else step
    template = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), self._state_metadata(step))
    return self.manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(template)}))[STATE_ITEM]

  def restore_latest(self, template, report=print):
    """(state, step, data_state) from the newest intact checkpoint, or (template, 0, None) when there is none.
    Damaged checkpoints newer than it are reported and moved to `damaged_directory`; NoUsableCheckpointError if all
    are damaged."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(template, step)
        data_state = self.data_state(step)
      except ConfigMismatchError:
        raise
      except Exception as e:  # unreadable, truncated, missing files, or a digest mismatch: the checkpoint is damaged
        damaged.append(step)
        report(f'Checkpoint step {step} in {self.directory} is damaged ({_first_line(e)}).')
        continue
      if self.saved_digest(step) is None:
        report(f'Checkpoint step {step} has no readable digest: restored without verifying its content.')
      for s in damaged:
        report(f'Moved the damaged checkpoint step {s} to {self._set_aside(s)}.')
      if damaged:
        report(f'Resuming from step {step}, the newest intact checkpoint.')
      return state, step, data_state
    if damaged:
      raise NoUsableCheckpointError(
          f'Every checkpoint in {self.directory} is damaged (steps {sorted(damaged)}); see the messages above. '
          'Move that directory away to start the run from scratch, or use another --workdir.')
    return template, 0, None

  def _set_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.damaged_directory, str(step))
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(self.damaged_directory, exist_ok=True)
      i = 1
      while os.path.exists(dst):
        dst, i = os.path.join(self.damaged_directory, f'{step}-{i}'), i + 1
      os.rename(src, dst)
    distributed.barrier(f'set_aside_{step}')  # several processes: reload only once process 0 has moved it
    self.manager.reload()
    return dst

  def wait(self) -> None:
    with self._storage_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._storage_errors():
      self.manager.wait_until_finished()
      self.manager.close()

  def abandon(self) -> None:
    """Closes after a failure, whatever state the writes are in: waits for those in flight and lets none of their
    errors hide the failure being reported."""
    for finish in (self.manager.wait_until_finished, self.manager.close):
      try:
        finish()
      except Exception:  # already failed, or failing for the same reason
        pass


def restore_from_workdir(config, workdir: str, mesh, step: int | None = None):
  """(model, state, step) of the run in `workdir` at checkpoint `step` (default: the latest), replicated over
  `mesh`, verified against its digest; a clear error when there is no such checkpoint."""
  directory = os.path.join(workdir, 'checkpoints')
  ckpt = Checkpointer(workdir) if os.path.isdir(directory) else None
  steps = ckpt.all_steps() if ckpt else []
  if not steps:
    raise CheckpointNotFoundError(
        f'No checkpoint under {directory}. Train one (python -m resnet_jax.main --config=... --workdir={workdir}) '
        'or convert torchvision weights into it (python -m resnet_jax.torchvision_weights --help).')
  if step is not None and step not in steps:
    ckpt.close()
    raise CheckpointNotFoundError(f'No checkpoint of step {step} under {directory}; it has steps {steps}.')
  step = max(steps) if step is None else step
  model = models.create_model(config.model, bn_group_size=config.bn_group_size)
  template = train_step.create_state(config, model, mesh, abstract=True)
  try:
    state = ckpt.restore(template, step)
  finally:
    ckpt.close()
  return model, state, step
