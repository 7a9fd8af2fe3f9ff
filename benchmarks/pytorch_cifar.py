"""An independent PyTorch trainer for the paper's CIFAR-10 recipe, to check our results against:

  python benchmarks/pytorch_cifar.py --data_dir=DIR --depth=20 --workdir=W [--steps=N] [--seed=S]
                                     [--val_examples=5000] [--device=cpu|cuda]

It shares no code with the package and is written the way the common PyTorch reproductions are: the option-A
ResNet-20/32/44/56/110 of benchmarks/pytorch_reference.py (3x3 stem, 16/32/64 filters, stride-2 subsampling and
zero channels on the shortcuts where the shape changes), He-normal init of every conv and of the fc weights
(the fc bias keeps PyTorch's default), nn.BatchNorm2d over the whole batch (momentum 0.1, eps 1e-5),
torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4) on every parameter, lr divided by 10 at 32k and 48k of
64k iterations at batch 128 (ResNet-110: lr 0.01 until the training error is below 80%, then 0.1), cross entropy.
Input: per-pixel mean subtracted, 4 pixels of zeros padded on each side, a random 32x32 crop and a horizontal flip
drawn per example; testing on the single original view with the BN moving averages.

Data: DIR/train/<class>/*.{png,jpg,jpeg,bmp} (and DIR/test/<class>/* when present), decoded once with Pillow and
kept on the device as uint8; the batch is gathered, cropped and flipped there, so a GPU is not waited on by a
Python loader. `--val_examples` training images are held out as resnet_jax does it: the first N of
numpy.random.default_rng(0).permutation(number of training images), over the images listed class by class in
sorted order, each class's files sorted by name.

`--steps N` shortens the recipe to N iterations with the drops at 50% and 75%, logging every N/20 and evaluating
every N/10 iterations, as `python -m experiments.table6 --steps N` does; without it, the paper's 64k with a log
line every 100 iterations and an evaluation every 2,000 (the resnet_jax configs' cadence).

Writes into the workdir what `python -m resnet_jax.main` writes there, with the same keys at the same steps, so
`python -m experiments.report` and its Fig. 6 plot put both side by side: metrics.jsonl (step, lr, train_loss,
train_error, examples_per_sec at log points; val_loss/val_error and test_loss/test_error at evaluation points),
config.json (with "trainer": "pytorch"), data.json (examples per split, class names), run_info.json (wall time
over every invocation, device), and checkpoint.pt, written atomically at every evaluation and on SIGTERM/SIGINT.
Started again with the same flags it resumes from there, with the batches an uninterrupted run would draw; other
flags on a workdir with a checkpoint are refused. Exit status 0 when done, 3 when stopped by a signal (resumable), 1 with one error line.
"""
import argparse
import json
import math
import os
import platform
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_reference import CifarData, ResNet, he_normal_  # noqa: E402

PAPER_STEPS, PAPER_BOUNDARIES = 64_000, (32_000, 48_000)
EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')
STOPPED = 3


class UserError(Exception):
  """A mistake in the flags, the data or the workdir: one line, exit status 1."""


def recipe(args) -> dict:
  """The run's recipe and cadence: the paper's, or shortened to --steps keeping the drops at 50% and 75%."""
  steps = args.steps or PAPER_STEPS
  shortened = steps != PAPER_STEPS
  return {
      'num_steps': steps,
      'lr_boundaries': [max(1, round(b * steps / PAPER_STEPS)) for b in PAPER_BOUNDARIES],
      'log_every_steps': max(1, steps // 20) if shortened else 100,
      'eval_every_steps': max(1, steps // 10) if shortened else 2_000,
      'warmup': args.depth >= 110,  # Sec. 4.2: lr 0.01 until the training error is below 80%, then 0.1
      'warmup_max_steps': max(1, round(2_000 * steps / PAPER_STEPS)),
  }


# --------------------------------------------------------------------------------------------------------------
# Data.

def list_split(root: str, split: str):
  """(class names, [(path, label), ...]) of root/split/<class>/*, classes and files in sorted order."""
  d = os.path.join(root, split)
  classes = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
  items = [(os.path.join(d, c, f), label) for label, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(d, c))) if f.lower().endswith(EXTENSIONS)]
  return classes, items


def decode(items, size: int = 32):
  from PIL import Image
  images = np.empty((len(items), size, size, 3), np.uint8)
  for i, (path, _) in enumerate(items):
    with Image.open(path) as im:
      im = im.convert('RGB')
      if im.size != (size, size):
        raise UserError(f'{path} is {im.size[0]}x{im.size[1]}, not {size}x{size}.')
      images[i] = np.asarray(im)
  return images, np.asarray([label for _, label in items], np.int64)


def load(data_dir: str, val_examples: int) -> dict:
  """{'train': (images, labels), 'val': ..., 'test': ...} (val and test where there are any), uint8 NHWC."""
  if not os.path.isdir(os.path.join(data_dir, 'train')):
    raise UserError(f'No image folder at {data_dir!r}: expected {data_dir}/train/<class>/*.png|jpg (and optionally '
                    f'{data_dir}/test/<class>/*), e.g. a JPEG copy of CIFAR-10 (see docs/cifar.md).')
  classes, items = list_split(data_dir, 'train')
  if not items:
    raise UserError(f'No images under {data_dir}/train/<class>/.')
  images, labels = decode(items)
  out = {'classes': classes}
  if val_examples:
    if not 0 < val_examples < len(labels):
      raise UserError(f'--val_examples={val_examples} must be between 0 and the {len(labels)} training images.')
    order = np.random.default_rng(0).permutation(len(labels))
    val, train = np.sort(order[:val_examples]), np.sort(order[val_examples:])
    out['val'] = images[val], labels[val]
    images, labels = images[train], labels[train]
  out['train'] = images, labels
  if os.path.isdir(os.path.join(data_dir, 'test')):
    test_classes, test_items = list_split(data_dir, 'test')
    if test_classes != classes:
      raise UserError(f'The classes of {data_dir}/test differ from those of {data_dir}/train.')
    out['test'] = decode(test_items)
  return out


# --------------------------------------------------------------------------------------------------------------
# Training.

def evaluate(model, images, labels, mean, device, batch: int = 500) -> dict:
  """Loss and error over every image of the split (no image dropped), BN with its moving averages."""
  model.eval()
  loss = errors = 0.0
  with torch.no_grad():
    for start in range(0, len(labels), batch):
      x = torch.as_tensor(images[start:start + batch]).to(device).float() - mean
      y = torch.as_tensor(labels[start:start + batch]).to(device)
      logits = model(x.permute(0, 3, 1, 2))
      loss += float(F.cross_entropy(logits, y, reduction='sum'))
      errors += float((logits.argmax(1) != y).sum())
  model.train()
  return {'loss': loss / len(labels), 'error': errors / len(labels)}


def lr_at(step: int, r: dict, warmup_done: bool) -> float:
  if r['warmup'] and not warmup_done:
    return 0.01
  return 0.1 * 0.1 ** sum(step >= b for b in r['lr_boundaries'])


def run_record(args, r: dict) -> dict:
  """config.json: the fields experiments.report reads (as resnet_jax's config.json names them), and the rest of
  this run's settings."""
  return {
      'trainer': 'pytorch', 'torch': torch.__version__,
      'model': {'family': 'cifar', 'depth': args.depth, 'residual': True, 'shortcut': 'A'},
      'data': {'dataset': 'cifar10', 'source': 'folder', 'data_dir': os.path.abspath(args.data_dir),
               'val_examples': args.val_examples, 'streaming': False},
      'seed': args.seed, 'batch_size': args.batch_size, 'learning_rate': 0.1, 'momentum': 0.9, 'weight_decay': 1e-4,
      'bn_group_size': 0, 'precision': args.precision, **r}


def data_record(data: dict) -> dict:
  """data.json, as resnet_jax's trainer writes it: the examples of each split and the class names."""
  splits = {s: len(data[s][1]) for s in ('train', 'val', 'test') if s in data}
  return {f'{s}_examples': n for s, n in splits.items()} | {'class_names': data['classes']}


RESUME_CHECKED = ('model', 'seed', 'batch_size', 'num_steps', 'lr_boundaries', 'precision')


def write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def train(args) -> int:
  device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if args.threads:
    torch.set_num_threads(args.threads)
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision == 'tf32'
  if (args.depth - 2) % 6 or args.depth < 8:
    raise UserError(f'--depth={args.depth}: a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, ...).')
  r = recipe(args)
  os.makedirs(args.workdir, exist_ok=True)
  ckpt_path = os.path.join(args.workdir, 'checkpoint.pt')
  data = load(args.data_dir, args.val_examples)
  record, examples = run_record(args, r), data_record(data)
  saved = torch.load(ckpt_path, map_location=device, weights_only=False) if os.path.exists(ckpt_path) else None
  if saved is not None:
    diffs = [k for k in RESUME_CHECKED if saved['record'].get(k) != record[k]]
    diffs += [f'data: {k}' for k in sorted(set(examples) | set(saved['examples']))
              if examples.get(k) != saved['examples'].get(k)]
    if diffs:
      raise UserError(f'{args.workdir} holds a checkpoint of another run (differs in {", ".join(diffs)}); use '
                      'another --workdir or the flags it was started with.')
  write_json(os.path.join(args.workdir, 'config.json'), record)
  write_json(os.path.join(args.workdir, 'data.json'), examples)

  torch.manual_seed(args.seed)
  model = ResNet('cifar', args.depth, len(data['classes']))
  he_normal_(model.head.weight)
  model = model.to(device).to(memory_format=torch.channels_last)
  kwargs = {'fused': True} if device.type == 'cuda' else {'foreach': True}
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, **kwargs)
  train_data = CifarData(*data['train'], args.batch_size, device, seed=args.seed)
  step, window, warmup_done = 0, None, not r['warmup']
  error_ema = 0.9
  if saved is not None:
    model.load_state_dict(saved['model'])
    opt.load_state_dict(saved['optimizer'])
    step, window, warmup_done, error_ema = saved['step'], saved['window'], saved['warmup_done'], saved['error_ema']
  train_data.step = step

  metrics_path = os.path.join(args.workdir, 'metrics.jsonl')
  rows = []
  if step and os.path.exists(metrics_path):  # lines after the checkpoint are redone
    with open(metrics_path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          break
  with open(metrics_path + '.tmp', 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows if row['step'] <= step)
  os.replace(metrics_path + '.tmp', metrics_path)

  info_path = os.path.join(args.workdir, 'run_info.json')
  info = json.load(open(info_path)) if os.path.exists(info_path) else {'wall_seconds': 0.0, 'invocations': 0}
  name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or 'cpu')
  info.update(device=f'1 x {name} ({device.type}, PyTorch {torch.__version__})', planned_steps=r['num_steps'],
              invocations=info['invocations'] + 1)
  held_out = {s: data[s] for s in ('val', 'test') if s in data}
  print(f'PyTorch ResNet-{args.depth} seed {args.seed} on {device}: {len(data["train"][1])} training images, '
        + ', '.join(f'{len(v[1])} {s}' for s, v in held_out.items()) + f'; {r["num_steps"]} steps at batch '
        f'{args.batch_size}, lr drops at {r["lr_boundaries"]}' + (f'; resuming at step {step}' if step else ''),
        flush=True)

  stop = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop.append(signum))

  def save():
    state = {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'step': step, 'window': window,
             'warmup_done': warmup_done, 'error_ema': error_ema, 'record': record, 'examples': examples}
    torch.save(state, ckpt_path + '.tmp')
    os.replace(ckpt_path + '.tmp', ckpt_path)

  def write_info(t_start):
    info['wall_seconds'] += time.time() - t_start
    write_json(info_path, info)
    return time.time()

  t_info = t_window = time.time()
  window_start = step
  zero = lambda: torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, errors, examples
  window = window.to(device) if window is not None else zero()
  while step < r['num_steps'] and not stop:
    lr = lr_at(step, r, warmup_done)
    for group in opt.param_groups:
      group['lr'] = lr
    x, y = train_data.next()
    logits = model(x.contiguous(memory_format=torch.channels_last))
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    errors = (logits.detach().argmax(1) != y).sum()
    window += torch.stack([loss.detach().double() * len(y), errors.double(),
                           torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    step += 1
    if r['warmup'] and not warmup_done:  # a moving average of batch errors decides, as in resnet_jax
      error_ema = 0.9 * error_ema + 0.1 * float(errors) / len(y)
      warmup_done = error_ema < 0.8 or step >= r['warmup_max_steps']
    row = {}
    final = step == r['num_steps']
    if step % r['log_every_steps'] == 0 or final:
      loss_sum, err_sum, count = (float(v) for v in window.cpu())
      if not math.isfinite(loss_sum):
        raise UserError(f'The training loss became non-finite by step {step}.')
      now = time.time()
      row.update(lr=lr, train_loss=loss_sum / count, train_error=err_sum / count,
                 examples_per_sec=(step - window_start) * args.batch_size / max(now - t_window, 1e-9))
      window, window_start, t_window = zero(), step, now
    if step % r['eval_every_steps'] == 0 or final:
      for split, (images, labels) in held_out.items():
        e = evaluate(model, images, labels, train_data.mean, device)
        row.update({f'{split}_loss': e['loss'], f'{split}_error': e['error']})
    if row:
      with open(metrics_path, 'a') as f:
        f.write(json.dumps({'step': step, **row}) + '\n')
      shown = ' | '.join(f'{k} {100 * v:.2f}%' if k.endswith('error') else f'{k} {v:.4g}' for k, v in row.items())
      print(f'step {step}/{r["num_steps"]} | {shown}', flush=True)
    if step % r['eval_every_steps'] == 0 or final or stop:
      save()
      t_info = write_info(t_info)
  write_info(t_info)
  return STOPPED if step < r['num_steps'] else 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data_dir', required=True, help='Image folder: DIR/train/<class>/*, optional DIR/test/<class>/*.')
  p.add_argument('--depth', type=int, default=20, help='6n+2: 20, 32, 44, 56, 110.')
  p.add_argument('--workdir', required=True)
  p.add_argument('--steps', type=int, default=0, help='Iterations (0: the paper\'s 64k); drops at 50%% and 75%%.')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--val_examples', type=int, default=5000, help='Training images held out for validation.')
  p.add_argument('--device', choices=['cpu', 'cuda'], default=None, help='Default: cuda when available.')
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--precision', choices=['fp32', 'tf32'], default='fp32',
                 help='GPU only: fp32 (the paper; as resnet_jax\'s default matmul_precision=highest) or tf32.')
  p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: PyTorch\'s default).')
  args = p.parse_args(argv)
  if args.steps < 0 or args.batch_size <= 0:
    p.error('--steps must be >= 0 and --batch_size positive.')
  try:
    return train(args)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
