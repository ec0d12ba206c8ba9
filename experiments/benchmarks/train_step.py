"""Train-step throughput of the demo's UNet: jaxmed (jit, sharded over local devices) vs PyTorch.

    python experiments/benchmarks/train_step.py [--method inpainting|segmentation] [--batch 8]

Both sides train the same network (nnU-Net-like 2D UNet, conv-instance norm-LeakyReLU, strided
conv down, kernel-2 transposed conv up; parameter counts are checked equal) with the same loss
(in-painting: L1 + L2 on grid-masked input; segmentation: soft Dice + BCE) and Adam, on the
same batch shape. Warm-up (compilation) excluded; median of repeats. Prints steps/s, images/s
and the jaxmed / PyTorch ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jaxmed import demo
from jaxmed.methods import get_method
from jaxmed.train import sharding, trainer


def time_jaxmed(config, batch, steps, repeats):
  method = get_method(config)
  mesh = sharding.make_mesh(config.mesh)
  state, step, _ = trainer.setup(config, method, batch, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  gbatch = sharding.global_batch(batch, mesh)
  t = time.perf_counter()
  state, metrics = step(state, gbatch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, gbatch)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t) / steps)
  return statistics.median(times), compile_s, n_params


def torch_unet(in_ch, out_ch, features):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  def cna(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                         nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01))

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      f = features
      self.input_conv = cna(in_ch, f[0])
      self.enc = nn.ModuleList([cna(f[0], f[0])] + [
          nn.Sequential(cna(f[k - 1], f[k], 2), cna(f[k], f[k])) for k in range(1, len(f))])
      self.up = nn.ModuleList([nn.ConvTranspose2d(f[k + 1], f[k], 2, 2)
                               for k in range(len(f) - 1)])
      self.dec = nn.ModuleList([nn.Sequential(cna(2 * f[k], f[k]), cna(f[k], f[k]))
                                for k in range(len(f) - 1)])
      self.out = nn.Conv2d(f[0], out_ch, 1)

    def forward(self, x):
      x = self.input_conv(x)
      skips = []
      for k, block in enumerate(self.enc):
        x = block(x)
        skips.append(x)
      for k in reversed(range(len(self.up))):
        x = self.dec[k](torch.cat([self.up[k](x), skips[k]], 1))
      return self.out(x)

  return UNet()


def time_torch(method_name, batch, out_ch, features, steps, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  x = torch.from_numpy(np.moveaxis(batch["image"], -1, 1).copy())
  model = torch_unet(x.shape[1], out_ch, features)
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  if method_name == "inpainting":
    keep = (torch.rand(x.shape[0], 1, x.shape[2] // 8, x.shape[3] // 8) < 0.7).float()
    keep = keep.repeat_interleave(8, 2).repeat_interleave(8, 3)
    inputs, target = x * keep, x
    loss_fn = lambda y: (y - target).abs().mean() + ((y - target) ** 2).mean()
  else:
    inputs = x
    target = (torch.rand(x.shape[0], out_ch, *x.shape[2:]) > 0.9).float()

    def loss_fn(y):
      p = torch.sigmoid(y)
      tp = (p * target).sum((0, 2, 3))
      dice = 1 - (2 * tp + 1e-5) / (p.sum((0, 2, 3)) + target.sum((0, 2, 3)) + 1e-5)
      return dice.mean() + torch.nn.functional.binary_cross_entropy_with_logits(y, target)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  for _ in range(2):
    step()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      step()
    times.append((time.perf_counter() - t) / steps)
  return statistics.median(times), n_params


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="inpainting", choices=("inpainting", "segmentation"))
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: demo's)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()

  pre, ft = demo.demo_configs(quick=False)
  config = pre if args.method == "inpainting" else ft
  config.data.augment.enabled = False  # same work on both sides
  batch_size = args.batch or config.batch_size
  h, w = config.data.shape[1:]
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, h, w, 4)).astype(np.float32),
           "label": rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(batch_size, h, w))}
  out_ch = 4 if args.method == "inpainting" else 3
  features = tuple(config.model.features)

  sec, compile_s, n_jax = time_jaxmed(config, batch, args.steps, args.repeats)
  rows = [("jaxmed", sec, n_jax)]
  if not args.no_torch:
    tsec, n_torch = time_torch(args.method, batch, out_ch, features, args.steps, args.repeats)
    if n_torch != n_jax:
      raise RuntimeError(f"parameter counts differ: jaxmed {n_jax} vs torch {n_torch}")
    rows.append((f"torch {__import__('torch').__version__}", tsec, n_torch))
  print(f"\n{args.method} train step, UNet features {features}, batch {batch_size} x {h}x{w}x4, "
        f"{jax.device_count()} {jax.default_backend()} device(s) "
        f"(jaxmed compile {compile_s:.1f} s, excluded)")
  print("| impl | params | ms/step | steps/s | images/s |")
  print("|---|---|---|---|---|")
  for name, s, n in rows:
    print(f"| {name} | {n:,} | {1e3 * s:.1f} | {1 / s:.2f} | {batch_size / s:.1f} |")
  if len(rows) == 2:
    print(f"\nspeed ratio jaxmed / torch (steps/s): {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
  main()
