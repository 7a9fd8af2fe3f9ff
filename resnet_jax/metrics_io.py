"""Run outputs: WORKDIR/metrics.jsonl (one JSON object per line), TensorBoard events, a console progress line."""
import json
import os
import time

from resnet_jax.errors import DamagedRecordError, writing


class MetricsWriter:
  """Appends metrics lines; on resume, drops the lines written after the restored step (they will be redone)."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = enabled
    self.tb = None
    if not enabled:
      return
    rows = [r for r in read_metrics(self.path) if r['step'] <= resume_step] if resume_step else []
    with writing(self.path):
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
      os.replace(self.path + '.tmp', self.path)
    try:
      from tensorboardX import SummaryWriter  # optional: pip install tensorboardX
      # purge_step: TensorBoard drops the old events of the steps a resumed run redoes, as the lines above.
      self.tb = SummaryWriter(workdir, purge_step=resume_step + 1 if resume_step else None)
    except ImportError:
      pass

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with writing(self.path):
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, float(v), int(step))
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl. A last line cut short (a run killed while writing it) is dropped: a resumed run
  writes it again. Any other line that is not a JSON object is damage: ValueError naming the line."""
  if not os.path.exists(path):
    return []
  with open(path, errors='replace') as f:
    lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
  rows = []
  for i, (n, line) in enumerate(lines):
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get('step'), int):
        raise ValueError('not a metrics row')
    except ValueError as e:
      if i == len(lines) - 1:  # the last line, cut short by a kill
        break
      raise DamagedRecordError(f'{path} line {n} is not a metrics row ({e}): the file is damaged. Restore it, or '
                               'delete that line (its step is then missing from the record), and run again.') from None
    rows.append(row)
  return rows


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


class Progress:
  """One console line per log point: step, lr, loss, errors, speed and ETA."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.total, self.start, self.t0, self.enabled = total_steps, start_step, time.time(), enabled

  def line(self, step: int, m: dict, prefix: str = '') -> str:
    parts = [f'{prefix}step {step}/{self.total}']
    if 'lr' in m:
      parts.append(f'lr {m["lr"]:.4g}')
    if 'train_loss' in m:
      parts.append(f'loss {m["train_loss"]:.4f}')
    for k, name in (('train_error', 'train err'), ('val_error', 'val err'), ('test_error', 'test err')):
      if k in m:
        parts.append(f'{name} {100 * m[k]:.2f}%')
    if 'examples_per_sec' in m:
      parts.append(f'{m["examples_per_sec"]:.0f} img/s')
    done = step - self.start
    if done > 0 and step < self.total:
      parts.append(f'ETA {_fmt_time((time.time() - self.t0) / done * (self.total - step))}')
    return ' | '.join(parts)

  def print(self, step: int, m: dict, prefix: str = '') -> None:
    if self.enabled:
      print(self.line(step, m, prefix), flush=True)
