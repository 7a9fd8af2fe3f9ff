"""How fast the training loop runs, one factor at a time: `python -m resnet_jax.main` itself (logging, evaluation,
checkpoints, the host between steps), not the step alone (`python -m resnet_jax.time_step` times that).

  python benchmarks/loop_speed.py --config=configs/cifar_20.py --steps=3000 [--data_dir=DIR] [--out=FILE.jsonl] \
      [--variant NAME:FIELD=VALUE,FIELD=VALUE ...]

Each variant is a fresh run in a temporary workdir, one after the other: the config's recipe shortened to --steps
(the learning rate divided at 50% and 75%), its evaluation and checkpoint cadence unless the variant changes it. Its speed is the training images per second over every log
window after the first (which holds the compilation): the harmonic mean of the windows' `examples_per_sec`, i.e.
images over time, so the evaluations and checkpoints written between windows count against it. Without
--variant, the default set: the defaults; 1, 10 and 100 steps per call; matmul_precision=default (TF32 on recent
NVIDIA GPUs); whole-batch BN; no evaluation or checkpoint before the end; and all of these together.
--data_dir: a CIFAR-10 image folder (DIR/train/<class>/*, held out 5,000 for validation); without it the embedded
digits at 32x32 (the same network and step, a smaller evaluation).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = [
    'defaults:',
    'steps_per_call_1:steps_per_call=1',
    'steps_per_call_10:steps_per_call=10',
    'steps_per_call_100:steps_per_call=100',
    'tf32:matmul_precision=default',
    'bn_whole_batch:bn_group_size=0',
    'no_eval_ckpt:eval_every_steps=STEPS,checkpoint_every_steps=STEPS',
    'all:matmul_precision=default,bn_group_size=0,eval_every_steps=STEPS,checkpoint_every_steps=STEPS,'
    'steps_per_call=100',
]


def parse_variant(text: str, steps: int):
  name, _, fields = text.partition(':')
  overrides = {}
  for item in filter(None, fields.split(',')):
    key, _, value = item.partition('=')
    overrides[key] = value.replace('STEPS', str(steps))
  return name, overrides


def loop_images_per_sec(rows) -> float | None:
  """Images per second over the log windows after the first: the harmonic mean of their examples_per_sec."""
  speeds = [r['examples_per_sec'] for r in rows if 'examples_per_sec' in r][1:]
  return len(speeds) / sum(1 / s for s in speeds) if speeds else None


def run_variant(python, config, steps, data_args, overrides, log_every) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    args = [python, '-m', 'resnet_jax.main', f'--config={config}', f'--workdir={workdir}',
            f'--config.num_steps={steps}', f'--config.lr_boundaries=({steps // 2},{3 * steps // 4})',
            f'--config.log_every_steps={log_every}', *data_args,
            *(f'--config.{k}={v}' for k, v in overrides.items())]
    t0 = time.time()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
      return {'error': (proc.stderr or proc.stdout).strip().splitlines()[-1:], 'wall_s': wall}
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
  return {'images_per_sec': loop_images_per_sec(rows), 'wall_s': wall,
          'windows': [round(r['examples_per_sec']) for r in rows if 'examples_per_sec' in r]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default='configs/cifar_20.py')
  p.add_argument('--steps', type=int, default=3000)
  p.add_argument('--log_every', type=int, default=0, help='Steps per log window (0: steps / 10).')
  p.add_argument('--data_dir', default='', help='A CIFAR-10 image folder; default: the embedded digits at 32x32.')
  p.add_argument('--variant', action='append', default=[], help='NAME:FIELD=VALUE,... (STEPS: the --steps value).')
  p.add_argument('--out', default='', help='Append one JSON line per variant to this file.')
  p.add_argument('--python', default=sys.executable)
  a = p.parse_args(argv)
  if a.data_dir:
    data_args = ['--config.data.source=folder', f'--config.data.data_dir={a.data_dir}', '--config.data.val_examples=5000']
  else:
    data_args = ['--config.data.source=embedded', '--config.data.dataset=digits']
  log_every = a.log_every or max(1, a.steps // 10)
  for text in a.variant or DEFAULT_VARIANTS:
    name, overrides = parse_variant(text, a.steps)
    r = {'variant': name, 'overrides': overrides, 'config': a.config, 'steps': a.steps, 'log_every': log_every,
         'data': a.data_dir or 'embedded digits 32x32', 'host': platform.node(),
         **run_variant(a.python, a.config, a.steps, data_args, overrides, log_every)}
    speed = r.get('images_per_sec')
    print(f'{name:22s} ' + (f'{speed:10,.0f} images/s in the loop, {r["wall_s"]:.0f} s for the command'
                            if speed else f'FAILED: {r.get("error")}'), flush=True)
    if a.out:
      with open(a.out, 'a') as f:
        f.write(json.dumps(r) + '\n')


if __name__ == '__main__':
  main()
