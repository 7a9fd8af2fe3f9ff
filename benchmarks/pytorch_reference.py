"""The same training step in PyTorch, written here (no torchvision), to time ours against:

  python benchmarks/pytorch_reference.py --net=cifar --depth=20 [--mode=eager|compile] [--amp=none|bf16|fp16]
                                         [--channels-last] [--steps=N] [--repeats=R] [--json]
  python benchmarks/pytorch_reference.py --net=imagenet --depth=50 --mode=compile --amp=bf16 --channels-last

Networks: the CIFAR ResNets of Sec. 4.2 (3x3 stem, 16/32/64 filters, option A shortcuts: stride-2 subsampling and
zero-padded channels) and the ImageNet ResNet-50 of Table 1 with the paper's v1 bottleneck (stride on the first
1x1) and option B projections, He-normal init as ours. The step: cross entropy, backward, SGD with momentum 0.9 and
weight decay 1e-4 on every parameter (as our default `weight_decay_on='all'`), BatchNorm in training mode.

Data lives on the device, as in ours. CIFAR: a uint8 training set of 50,000 random images; each step takes its
128 indices from an epoch permutation, subtracts the per-pixel mean, pads 4 pixels, crops a random 32x32 window
per example and flips half the examples, all as tensor ops on the device (the same work as our step's
augmentation). ImageNet: a pool of random uint8 images on the device; each step gathers a batch and flips half
(our benchmark does the same).

BatchNorm normalises over the whole batch (nn.BatchNorm2d); run ours with `--config.bn_group_size=0` for the same
arithmetic (benchmarks/compare.py does).

PyTorch is an optional benchmark dependency: nothing in resnet_jax imports it.
"""
import argparse
import json
import math
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_STAGES = {18: ([2, 2, 2, 2], False), 34: ([3, 4, 6, 3], False), 50: ([3, 4, 6, 3], True),
                   101: ([3, 4, 23, 3], True), 152: ([3, 8, 36, 3], True)}


def he_normal_(w):
  nn.init.kaiming_normal_(w, mode='fan_in', nonlinearity='relu')  # std sqrt(2 / fan_in), as ours


class ShortcutA(nn.Module):
  """Option A: identity, or stride-s subsampling and zero channels where the shape changes."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.stride, self.extra = stride, cout - cin

  def forward(self, x):
    if self.stride == 1 and self.extra == 0:
      return x
    x = x[:, :, ::self.stride, ::self.stride]
    return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class ShortcutB(nn.Module):
  """Option B: 1x1 projection + BN where the shape changes, identity elsewhere."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.proj = None
    if stride != 1 or cin != cout:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    return x if self.proj is None else self.proj(x)


class Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, filters, stride, shortcut):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, filters, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters)
    self.shortcut = shortcut(cin, filters, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class Bottleneck(nn.Module):
  """v1: stride on the first 1x1 (the paper)."""
  expansion = 4

  def __init__(self, cin, filters, stride, shortcut):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, filters, 1, stride, bias=False)
    self.bn1 = nn.BatchNorm2d(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(filters)
    self.conv3 = nn.Conv2d(filters, filters * 4, 1, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(filters * 4)
    self.shortcut = shortcut(cin, filters * 4, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):

  def __init__(self, net: str, depth: int, num_classes: int):
    super().__init__()
    if net == 'cifar':
      if depth < 8 or (depth - 2) % 6:
        raise ValueError(f'CIFAR depth must be 6n+2, got {depth}.')
      sizes, filters, block, shortcut = [(depth - 2) // 6] * 3, (16, 32, 64), Basic, ShortcutA
      self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
      cin = 16
    else:
      if depth not in IMAGENET_STAGES:
        raise ValueError(f'ImageNet depth must be one of {sorted(IMAGENET_STAGES)}, got {depth}.')
      sizes, bottleneck = IMAGENET_STAGES[depth]
      filters, block = (64, 128, 256, 512), (Bottleneck if bottleneck else Basic)
      shortcut = ShortcutB if bottleneck else ShortcutA
      self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                nn.MaxPool2d(3, 2, 1))
      cin = 64
    layers = []
    for s, (n, f) in enumerate(zip(sizes, filters)):
      for b in range(n):
        layers.append(block(cin, f, 2 if (s > 0 and b == 0) else 1, shortcut))
        cin = f * block.expansion
    self.blocks = nn.Sequential(*layers)
    self.head = nn.Linear(cin, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        he_normal_(m.weight)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def macs_per_image(model, image_size, device):
  """Conv and fc multiply-adds of one forward image (as resnet_jax/summary.py counts them)."""
  total = 0

  def hook(m, inp, out):
    nonlocal total
    if isinstance(m, nn.Conv2d):
      total += out[0].numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
    elif isinstance(m, nn.Linear):
      total += out[0].numel() * m.in_features

  handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
  with torch.no_grad():
    model.eval()
    model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train()
  for h in handles:
    h.remove()
  return total


class CifarData:
  """A CIFAR training set on the device as uint8 NHWC; each step's batch is gathered and augmented there.

  The batch of step k is a function of (seed, k) alone: epoch e's order comes from a generator seeded with
  (seed, 0, e), step k's crops and flips from one seeded with (seed, 1, k). So a trainer that resumes at step k
  draws exactly the batches an uninterrupted run would, without saving any generator state."""

  def __init__(self, images, labels, batch, device, pad=4, seed=0):
    images = torch.as_tensor(images)
    self.images = images.to(device)                                          # (N, H, W, C) uint8
    self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
    self.mean = images.double().mean(0).float().to(device)                   # the per-pixel mean (H, W, C)
    self.n, self.size, self.batch, self.pad, self.device = len(images), images.shape[1], batch, pad, device
    self.steps_per_epoch = self.n // batch                                   # the last partial batch is dropped
    self.seed, self.step, self._epoch, self._perm = seed, 0, None, None

  @classmethod
  def random(cls, n, size, batch, device, pad=4, seed=0):
    """Random images and labels: the same work per step as real data, for timing."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    return cls(images, torch.randint(0, 10, (n,), generator=g), batch, device, pad, seed)

  def _generator(self, stream, index):
    key = int(np.random.SeedSequence((self.seed, stream, index)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=self.device).manual_seed(key)

  def next(self):
    epoch, within = divmod(self.step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch, self._perm = epoch, torch.randperm(self.n, device=self.device, generator=self._generator(0, epoch))
    idx = self._perm[within * self.batch:(within + 1) * self.batch]
    g = self._generator(1, self.step)
    self.step += 1
    x = self.images[idx].float() - self.mean                          # (B, H, W, C)
    p, s, b = self.pad, self.size, self.batch
    x = F.pad(x, (0, 0, p, p, p, p))                                   # zero border = the mean image
    off = torch.randint(0, 2 * p + 1, (b, 2), device=self.device, generator=g)
    ar = torch.arange(s, device=self.device)
    rows = (off[:, 0:1] + ar)[:, :, None]                              # (B, S, 1)
    cols = (off[:, 1:2] + ar)[:, None, :]                              # (B, 1, S)
    x = x[torch.arange(b, device=self.device)[:, None, None], rows, cols]   # per-example crop (B, S, S, C)
    flip = torch.rand(b, device=self.device, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(2), x)
    return x.permute(0, 3, 1, 2), self.labels[idx]                     # NCHW view of NHWC memory


class PoolData:
  """ImageNet: a pool of random images on the device; each step gathers a batch and flips half."""

  def __init__(self, n, size, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    self.images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).to(device)
    self.labels = torch.randint(0, 1000, (n,), generator=g).to(device)
    self.mean = torch.full((size, size, 3), 127.5, device=device)
    self.n, self.batch, self.device = n, batch, device

  def next(self):
    idx = torch.randint(0, self.n, (self.batch,), device=self.device)
    x = self.images[idx].float() - self.mean
    flip = torch.rand(self.batch, device=self.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(2), x)
    return x.permute(0, 3, 1, 2), self.labels[idx]


def run(net='cifar', depth=20, batch=128, mode='eager', amp='none', channels_last=False, steps=20, repeats=3,
        warmup=3, examples=50_000, pool=512, device=None, threads=0):
  device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if threads:
    torch.set_num_threads(threads)
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True   # float32 as TF32 on tensor cores, as XLA's default precision
    torch.backends.cudnn.allow_tf32 = True
  torch.manual_seed(0)
  size, classes = (32, 10) if net == 'cifar' else (224, 1000)
  model = ResNet(net, depth, classes).to(device)
  macs = macs_per_image(model, size, device)
  params = sum(p.numel() for p in model.parameters())
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  kwargs = {'fused': True} if device.type == 'cuda' else {'foreach': True}
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, **kwargs)
  data = (CifarData.random(examples, size, batch, device) if net == 'cifar' else PoolData(pool, size, batch, device))
  amp_dtype = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]
  scaler = torch.amp.GradScaler(device.type) if amp == 'fp16' else None
  fwd = torch.compile(model) if mode == 'compile' else model

  def step():
    x, y = data.next()
    x = x.contiguous(memory_format=memory_format)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
      loss = F.cross_entropy(fwd(x), y)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
      scaler.scale(loss).backward()
      scaler.step(opt)
      scaler.update()
    else:
      loss.backward()
      opt.step()
    return loss

  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(warmup):  # includes torch.compile's compilation
    loss = step()
  float(loss.detach())
  sync()
  warmup_s = time.perf_counter() - t0
  windows, cpu_windows = [], []
  for _ in range(repeats):
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
      loss = step()
    sync()
    windows.append((time.perf_counter() - start) / steps)
    cpu_windows.append((time.process_time() - cpu_start) / steps)
  final_loss = float(loss.detach())
  step_time = statistics.median(windows)
  ips = batch / step_time
  return dict(framework='pytorch', torch=torch.__version__, net=net, depth=depth, batch_size=batch, mode=mode,
              amp=amp, channels_last=channels_last, device=str(device),
              device_kind=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor(),
              threads=torch.get_num_threads(), warmup_steps=warmup, warmup_s=warmup_s, steps=steps,
              repeats=repeats, step_time_s=step_time, step_times_s=windows,
              process_cpu_s_per_step=statistics.median(cpu_windows), images_per_sec=ips, params=params,
              macs_per_image=macs, model_flops_per_sec=6 * macs * ips, final_train_loss=final_loss)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--net', choices=['cifar', 'imagenet'], default='cifar')
  p.add_argument('--depth', type=int, default=20)
  p.add_argument('--batch', type=int, default=0, help='0: 128 for CIFAR, 256 for ImageNet (the paper)')
  p.add_argument('--mode', choices=['eager', 'compile'], default='eager')
  p.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='none')
  p.add_argument('--channels-last', action='store_true')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--examples', type=int, default=50_000)
  p.add_argument('--pool', type=int, default=512)
  p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
  p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: PyTorch default)')
  p.add_argument('--json', action='store_true')
  a = p.parse_args()
  batch = a.batch or (128 if a.net == 'cifar' else 256)
  try:
    r = run(a.net, a.depth, batch, a.mode, a.amp, a.channels_last, a.steps, a.repeats, a.warmup, a.examples,
            a.pool, a.device, a.threads)
  except ValueError as e:
    raise SystemExit(f'error: {e}')
  if a.json:
    print(json.dumps(r), flush=True)
  else:
    print(f'PyTorch {r["torch"]} {a.net} ResNet-{a.depth} {a.mode} amp={a.amp} channels_last={a.channels_last} '
          f'batch {batch} on {r["device"]} ({r["threads"]} threads)\n'
          f'  warm-up {r["warmup_s"]:.1f} s for {a.warmup} steps\n'
          f'  step {1e3 * r["step_time_s"]:.2f} ms (median of {a.repeats} x {a.steps}; '
          f'{1e3 * r["process_cpu_s_per_step"]:.0f} ms process CPU per step)\n'
          f'  {r["images_per_sec"]:,.0f} images/s, {r["model_flops_per_sec"] / 1e12:.3f} model TFLOP/s', flush=True)


if __name__ == '__main__':
  main()
