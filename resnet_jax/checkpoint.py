"""Checkpoints with orbax-checkpoint under WORKDIR/checkpoints.

orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-write never
leaves a checkpoint that looks finished. The config is recorded in WORKDIR/config.json; resuming with a config
that changes the model or the data is refused, naming the fields, unless forced.
"""
import json
import os

import flax.serialization
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

# Fields that change the model or the data: a checkpoint is only resumed under the same values.
RESUME_CHECKED = ('model', 'data', 'batch_size', 'seed', 'bn_group_size')


class ConfigMismatchError(ValueError):
  pass


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)), force=force)

  def restore(self, template, step: int | None = None):
    """Restores `step` (default: the latest) into the structure and shardings of `template`."""
    step = self.latest_step() if step is None else step
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        flax.serialization.to_state_dict(template))
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    return flax.serialization.from_state_dict(template, restored)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def config_to_dict(config: ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def check_resume_config(saved: dict, config: ConfigDict) -> None:
  """Raises ConfigMismatchError naming every model/data field that differs from the checkpointed run's."""
  old = {k: v for k, v in _flatten(saved).items() if k.split('.')[0] in RESUME_CHECKED}
  new = {k: v for k, v in _flatten(config_to_dict(config)).items() if k.split('.')[0] in RESUME_CHECKED}
  diffs = [f'  {k}: checkpoint has {old.get(k, "<absent>")!r}, this run has {new.get(k, "<absent>")!r}'
           for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if diffs:
    raise ConfigMismatchError(
        'The workdir holds a checkpoint of a run whose model or data differ from this config:\n' + '\n'.join(diffs)
        + '\nUse another --workdir, restore those values, or pass --force_resume to resume anyway.')
