"""Train-step throughput of the demo's UNet: jaxmed (jit, sharded over local devices) vs PyTorch.

    python experiments/benchmarks/train_step.py [--method inpainting|segmentation] [--batch 8]

Both sides train the same network (nnU-Net-like 2D UNet, conv-instance norm-LeakyReLU, strided
conv down, kernel-2 transposed conv up; parameter counts are checked equal) with the same loss
(in-painting: L1 + L2 on grid-masked input; segmentation: soft Dice + BCE) and Adam, on the
same batch shape. Warm-up (compilation) excluded; median of repeats, the two sides' timed blocks
alternating. Both run in this one process, so under the same glibc ``malloc`` settings (those
importing jaxmed sets: ``jaxmed/_malloc.py``). Prints steps/s, images/s and the jaxmed / PyTorch
ratio.
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


def jaxmed_runner(config, batch):
  """(run(steps) -> None, compile seconds, parameter count) for jaxmed's compiled train step."""
  method = get_method(config)
  mesh = sharding.make_mesh(config.mesh)
  state, step, _ = trainer.setup(config, method, batch, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  gbatch = sharding.global_batch(batch, mesh)
  t = time.perf_counter()
  state, metrics = step(state, gbatch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t

  def run(steps):
    nonlocal state
    for _ in range(steps):
      state, metrics = step(state, gbatch)
    jax.block_until_ready(metrics)

  return run, compile_s, n_params


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


def torch_runner(method_name, batch, out_ch, features):
  """(run(steps) -> None, parameter count) for the same step in PyTorch."""
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

  def run(steps):
    for _ in range(steps):
      step()

  return run, n_params


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

  runners = {}
  run, compile_s, n_jax = jaxmed_runner(config, batch)
  runners["jaxmed"] = (run, n_jax)
  if not args.no_torch:
    run, n_torch = torch_runner(args.method, batch, out_ch, features)
    if n_torch != n_jax:
      raise RuntimeError(f"parameter counts differ: jaxmed {n_jax} vs torch {n_torch}")
    runners[f"torch {__import__('torch').__version__}"] = (run, n_torch)
  # The two sides' timed blocks alternate, so that a drift in the machine's speed (shared CPUs)
  # reaches both alike.
  times = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name, (run, _) in runners.items():
      t = time.perf_counter()
      run(args.steps)
      times[name].append((time.perf_counter() - t) / args.steps)
  rows = [(name, statistics.median(times[name]), n) for name, (_, n) in runners.items()]
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
