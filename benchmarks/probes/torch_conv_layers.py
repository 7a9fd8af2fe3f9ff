"""PyTorch's time for one 3x3 conv layer of each CIFAR stage (batch 128, channels-last, float32): forward, and the
input and weight gradients together. The per-layer counterpart of `benchmarks/probes/op_profile.py` for our side.

  taskset -c 0 python benchmarks/probes/torch_conv_layers.py [--threads 1] [--repeats 10]
"""
import argparse
import time

import torch


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--threads', type=int, default=1)
  ap.add_argument('--repeats', type=int, default=10)
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  print(f'torch {torch.__version__}, {args.threads} thread(s)')
  for channels, size in ((16, 32), (32, 16), (64, 8)):
    x = torch.randn(128, channels, size, size).to(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    for _ in range(3):
      y = conv(x)
    start = time.perf_counter()
    for _ in range(args.repeats):
      y = conv(x)
    forward = (time.perf_counter() - start) / args.repeats
    dy = torch.randn_like(y)
    for _ in range(2):
      torch.autograd.grad(y, (x, conv.weight), dy, retain_graph=True)
    start = time.perf_counter()
    for _ in range(args.repeats):
      torch.autograd.grad(y, (x, conv.weight), dy, retain_graph=True)
    backward = (time.perf_counter() - start) / args.repeats
    print(f'{channels:3d} channels at {size}x{size}: forward {forward * 1e3:6.2f} ms, '
          f'input+weight gradients {backward * 1e3:6.2f} ms')


if __name__ == '__main__':
  main()
