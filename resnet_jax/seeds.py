"""Several seeds in one program (config.num_seeds = K > 1; not in the paper, which reports best and mean +- std of
5 runs for ResNet-110, Table 6). Everything about several seeds lives here; a run of one seed passes through each
function unchanged, so the training loop (train.py) reads as the run of one seed.

The replicas have seeds config.seed, config.seed + 1, ..., each with its own initialisation, data order,
augmentation, BN statistics, warm-up and non-finite handling: replica k trains as the run with seed + k alone would.
Their states are stacked on a leading axis of one state, which is checkpointed as one. Each seed writes its metrics,
TensorBoard events and run record in WORKDIR/seed<s>/ (the layout the report reads as one run per seed).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import metrics_io, plotting, run_record, validation


def replica_seeds(config) -> list[int]:
  """The seeds of the replicas a run trains together: config.seed, config.seed + 1, ..., + config.num_seeds - 1."""
  return [config.seed + k for k in range(config.num_seeds)]


def seed_batching(config, mesh) -> str:
  """'vmap' or 'unroll' for the mesh's devices: config.seed_batching, with 'auto' unrolling on the CPU (whose
  grouped convolutions, what vmap makes of the seeds' convolutions, run in XLA's slow generic loop)."""
  if config.seed_batching != 'auto':
    return config.seed_batching
  return 'unroll' if mesh.devices.flat[0].platform == 'cpu' else 'vmap'


def initial_state(config, init_one):
  """A function of no arguments giving the run's initial state: init_one(config.seed), or the K replicas' states
  stacked on a leading axis, replica k from seed config.seed + k."""
  if config.num_seeds == 1:
    return lambda: init_one(config.seed)
  return lambda: jax.vmap(init_one)(jnp.asarray(replica_seeds(config), jnp.int32))


def over_replicas(config, mesh, step):
  """The run's step(state, *inputs) from the step of one replica, step(state, seed, *inputs). Several seeds share
  the data inputs and each draw their own batch from them: vmapped over the replica axis (each replica's batch is
  still sharded over the mesh: vmap leaves the replica axis of the sharding constraints unconstrained), or unrolled,
  one replica after the other in the same program (`seed_batching`)."""
  if config.num_seeds == 1:
    return lambda state, *inputs: step(state, config.seed, *inputs)
  if seed_batching(config, mesh) == 'vmap':
    def vmapped(state, *inputs):
      seeds = jnp.asarray(replica_seeds(config), jnp.int32)
      return jax.vmap(step, in_axes=(0, 0) + (None,) * len(inputs))(state, seeds, *inputs)
    return vmapped

  def unrolled(state, *inputs):
    outs = [step(jax.tree_util.tree_map(lambda a: a[k], state), seed, *inputs)
            for k, seed in enumerate(replica_seeds(config))]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
  return unrolled


def check_memory(config, mesh, compile_step) -> None:
  """Several seeds multiply the memory: refuses, before any write, a step that cannot fit (validation.check_memory
  on `compile_step()`, the compiled step). Nothing to check for one seed."""
  if config.num_seeds == 1:
    return
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  validation.check_memory(config, compile_step(), local)


def describe(config) -> str:
  """What the start-of-run line says of the seeds: ', seeds 0..4 in one program,' for several, '' for one."""
  s = replica_seeds(config)
  return f', seeds {s[0]}..{s[-1]} in one program,' if len(s) > 1 else ''


def replica(state, k: int, num_seeds: int):
  """The network of replica k (params and BN statistics) of a state with a leading seed axis; the state itself for
  one seed."""
  if num_seeds == 1:
    return state
  take = lambda tree: jax.tree_util.tree_map(lambda a: a[k], tree)
  return state.replace(params=take(state.params), batch_stats=take(state.batch_stats))


def each_replica(config, fn, state) -> dict:
  """fn(state of one network) -> {key: value}, applied to each replica: {key: value} for one seed, {key: [value of
  each replica]} for several (what `Outputs.write` takes)."""
  rows = [fn(replica(state, k, config.num_seeds)) for k in range(config.num_seeds)]
  if config.num_seeds == 1:
    return rows[0]
  return {key: [row[key] for row in rows] for key in rows[0]}


def where(config, k: int) -> str:
  """' in the replica of seed S' for replica k of several, '' for one seed: what an error message adds."""
  return f' in the replica of seed {config.seed + k}' if config.num_seeds > 1 else ''


def workdirs(config, workdir: str) -> list:
  """Where each seed's metrics.jsonl, TensorBoard events and run record go: the workdir itself for one seed;
  WORKDIR/seed<s>/ for each seed s of a run of several. The checkpoint and curves.png stay in the workdir."""
  if config.num_seeds == 1:
    return [workdir]
  return [os.path.join(workdir, f'seed{s}') for s in replica_seeds(config)]


def single_seed_config(config, seed: int):
  """The config of the run that trains `seed` alone: what replica `seed - config.seed` of `config` equals."""
  one = config.copy_and_resolve_references()
  one.seed, one.num_seeds = seed, 1
  return one


def write_records(config, workdir: str, data: dict) -> None:
  """The run record of the workdir, and for several seeds each seed's, as the run of that seed alone records it."""
  run_record.write(workdir, config, data)
  for seed, out in zip(replica_seeds(config), workdirs(config, workdir)):
    if out != workdir:
      os.makedirs(out, exist_ok=True)
      run_record.write(out, single_seed_config(config, seed), data)


def check_records(config, workdir: str) -> None:
  """Refuses, before any write, a damaged metrics record of any seed."""
  for out in workdirs(config, workdir):
    metrics_io.read_metrics(os.path.join(out, 'metrics.jsonl'))


class Outputs:
  """What a run writes as it goes, for one seed or several: the metrics lines (metrics.jsonl and TensorBoard), the
  progress line on the console, and at the end the curves. A row's values are numbers, or for several seeds a value
  per replica (a list or an array with a leading replica axis); a number in a row of several seeds is every seed's."""

  def __init__(self, config, workdir: str, start_step: int, enabled: bool = True):
    self._config, self._workdir, self._enabled = config, workdir, enabled
    self._seeds = replica_seeds(config)
    self._writers = [metrics_io.MetricsWriter(out, start_step, enabled=enabled)
                     for out in workdirs(config, workdir)]
    self._progress = metrics_io.Progress(config.num_steps, start_step, enabled=enabled)
    self.last = {}

  def _split(self, row: dict) -> list:
    k = len(self._seeds)
    if k == 1:
      return [{key: _number(v) for key, v in row.items()}]
    per = lambda v, i: v if np.ndim(v) == 0 and not isinstance(v, list) else v[i]
    return [{key: _number(per(v, i)) for key, v in row.items()} for i in range(k)]

  def write(self, step: int, row: dict) -> None:
    rows = self._split(row)
    several = len(rows) > 1
    for seed, writer, r in zip(self._seeds, self._writers, rows):
      writer.write(step, r)
      self._progress.print(step, r, prefix=f'seed {seed}: ' if several else '')
    self.last = ({'step': step, **rows[0]} if not several else
                 {'step': step, 'seeds': {seed: r for seed, r in zip(self._seeds, rows)}})

  def close(self) -> list:
    """Closes the writers; in the main process, draws curves.png and returns every seed's metrics rows."""
    for writer in self._writers:
      writer.close()
    if not self._enabled:
      return []
    per_seed = [metrics_io.read_metrics(writer.path) for writer in self._writers]
    c = self._config
    label = f'{"ResNet" if c.model.residual else "plain"}-{c.model.depth}'
    plotting.plot_curves({label: per_seed if len(per_seed) > 1 else per_seed[0]},
                         os.path.join(self._workdir, 'curves.png'))
    return per_seed


def _number(v):
  """A Python number of a numpy value (float stays float, integer stays int: what JSON writes differs)."""
  return v.item() if isinstance(v, (np.ndarray, np.generic)) else v
