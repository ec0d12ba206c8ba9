"""Forward and forward+backward time and peak memory of jaxmed backbones vs their PyTorch peers.

    python experiments/benchmarks/backbones.py [--repeats 5] [--only swin_unetr,mae3d,resnet50]

Cases (batch 1, float32, same architecture and trained-parameter count on both sides, checked):

* ``swin_unetr``: Swin-UNETR, feature 24, 64^3, 1 -> 14 channels, vs MONAI ``SwinUNETR``.
* ``mae3d``: 3D masked autoencoder, patch 8 on 64^3 (512 tokens, 128 visible at 0.75),
  encoder 12 x 768 (ViT-AE++), decoder 8 x 384 x 16 heads, vs MONAI ``MaskedAutoEncoderViT``
  set to the same sizes (MONAI's 3D sin-cos table needs a width divisible by 6, so the decoder is
  384 wide, MONAI's default, instead of ViT-AE++'s 512).
* ``resnet50``: ResNet-50 on 224^2 RGB with the 1000-class head vs MONAI ``ResNet`` in the
  torchvision configuration (the same network as ``torchvision.models.resnet50``).

Forward: inference mode (``torch.no_grad()``, eval; a jitted ``apply``). Forward+backward: the
gradient of ``mean(output**2)`` with respect to every parameter (for the MAE, of the mean squared
error on the masked patches). Warm-up (JAX compilation) excluded, median of ``--repeats`` calls.

Peak memory: every (case, side) runs in a fresh subprocess; the number is the growth of the
process's peak resident set (``ru_maxrss``) over its resident set just before the first call,
i.e. activations, gradients and workspace, not the weights or the framework. For JAX also
XLA's own estimate of the compiled step's temporary buffers is printed.

torch runs with as many threads as JAX has cores, once with glibc's ``malloc`` defaults (as
PyTorch runs unless told otherwise) and once with the settings importing jaxmed sets
(``jaxmed/_malloc.py``; ``--torch-malloc``): at 64^3 the second made MONAI's Swin-UNETR 1.4x
faster. jaxmed always runs with them. Prints a Markdown table; ratios > 1 mean
jaxmed is faster / smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = ("swin_unetr", "mae3d", "resnet50")


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_ms(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------------------------
# JAX side.


def _jax_case(case: str):
  """(model, variables, inputs, loss(params, *inputs), forward(variables, *inputs))."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  if case == "swin_unetr":
    from jaxmed.models.swin_unetr import SwinUNETR
    model = SwinUNETR(out_channels=14, feature_size=24)
    x = jnp.asarray(rng.normal(size=(1, 64, 64, 64, 1)), jnp.float32)
    inputs = (x,)
    forward = lambda v, x: model.apply(v, x)
  elif case == "mae3d":
    from jaxmed.models.vit import MaskedAutoencoderViT, patchify
    from jaxmed.pretext.masking import random_masking
    model = MaskedAutoencoderViT(patch_size=8, spatial_dims=3, decoder_embed_dim=384)
    x = jnp.asarray(rng.normal(size=(1, 64, 64, 64, 1)), jnp.float32)
    ids_keep, ids_restore, mask = random_masking(jax.random.key(0), 1, 512, 0.75)
    inputs = (x, ids_keep, ids_restore)

    def forward(v, x, ids_keep, ids_restore):
      return model.apply(v, x, ids_keep, ids_restore)[0]
  elif case == "resnet50":
    from jaxmed.models.resnet import resnet50
    model = resnet50(spatial_dims=2, num_classes=1000)
    x = jnp.asarray(rng.normal(size=(1, 224, 224, 3)), jnp.float32)
    inputs = (x,)
    forward = lambda v, x: model.apply(v, x)
  else:
    raise ValueError(f"unknown case {case!r}")

  variables = jax.jit(model.init)(jax.random.key(1), *inputs)

  def loss(params, *inputs):
    v = {**variables, "params": params}
    if case == "mae3d":
      pred, _ = model.apply(v, *inputs)
      target = patchify(inputs[0], 8)
      per_token = jnp.mean((pred - target) ** 2, axis=-1)
      return jnp.sum(per_token * mask) / jnp.sum(mask)
    return jnp.mean(forward(v, *inputs) ** 2)

  return variables, inputs, loss, forward


def run_jax(case: str, repeats: int) -> dict:
  import jax

  variables, inputs, loss, forward = _jax_case(case)
  n_params = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
  fwd = jax.jit(forward)
  grad = jax.jit(jax.grad(loss))
  temp_mb = None
  analysis = grad.lower(variables["params"], *inputs).compile().memory_analysis()
  if analysis is not None:
    temp_mb = analysis.temp_size_in_bytes / 2**20
  base = _rss_mb()
  fwd_ms = _median_ms(lambda: jax.block_until_ready(fwd(variables, *inputs)), repeats)
  peak_fwd = _peak_mb() - base
  bwd_ms = _median_ms(lambda: jax.block_until_ready(grad(variables["params"], *inputs)), repeats)
  return dict(params=n_params, fwd_ms=fwd_ms, fwdbwd_ms=bwd_ms, peak_fwd_mb=peak_fwd,
              peak_mb=_peak_mb() - base, xla_temp_mb=temp_mb)


# --------------------------------------------------------------------------------------------
# PyTorch side.


def _torch_case(case: str):
  import numpy as np
  import torch

  rng = np.random.default_rng(0)
  if case == "swin_unetr":
    from monai.networks.nets import SwinUNETR
    model = SwinUNETR(in_channels=1, out_channels=14, feature_size=24)
    x = torch.from_numpy(rng.normal(size=(1, 1, 64, 64, 64)).astype(np.float32))
    forward = lambda: model(x)
    loss = lambda: (model(x) ** 2).mean()
  elif case == "mae3d":
    from monai.networks.nets import MaskedAutoEncoderViT
    model = MaskedAutoEncoderViT(
        in_channels=1, img_size=64, patch_size=8, hidden_size=768, mlp_dim=3072, num_layers=12,
        num_heads=12, masking_ratio=0.75, decoder_hidden_size=384, decoder_mlp_dim=1536,
        decoder_num_layers=8, decoder_num_heads=16, pos_embed_type="sincos", qkv_bias=True)
    x = torch.from_numpy(rng.normal(size=(1, 1, 64, 64, 64)).astype(np.float32))
    forward = lambda: model(x)[0]

    def loss():
      pred, mask = model(x)
      patches = x.reshape(1, 1, 8, 8, 8, 8, 8, 8).permute(0, 2, 4, 6, 3, 5, 7, 1)
      target = patches.reshape(1, 512, 512)
      per_token = ((pred - target) ** 2).mean(-1)
      return (per_token * mask).sum() / mask.sum()
  elif case == "resnet50":
    from monai.networks.nets import ResNet
    model = ResNet(block="bottleneck", layers=(3, 4, 6, 3), block_inplanes=(64, 128, 256, 512),
                   spatial_dims=2, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2,
                   num_classes=1000, bias_downsample=False, shortcut_type="B")
    x = torch.from_numpy(rng.normal(size=(1, 3, 224, 224)).astype(np.float32))
    forward = lambda: model(x)
    loss = lambda: (model(x) ** 2).mean()
  else:
    raise ValueError(f"unknown case {case!r}")
  return model, forward, loss


def run_torch(case: str, repeats: int, threads: int) -> dict:
  import torch

  torch.set_num_threads(threads)
  model, forward, loss = _torch_case(case)

  def fwd():
    model.eval()
    with torch.no_grad():
      forward()

  def fwdbwd():
    model.train() if case == "mae3d" else model.eval()
    model.zero_grad(set_to_none=True)
    loss().backward()

  base = _rss_mb()
  fwd_ms = _median_ms(fwd, repeats)
  peak_fwd = _peak_mb() - base
  bwd_ms = _median_ms(fwdbwd, repeats)
  # The trained parameters: those that got a gradient (MONAI's ViT blocks carry an unused
  # cross-attention norm, and its MAE keeps the fixed sin-cos tables as frozen parameters).
  n_params = sum(p.numel() for p in model.parameters() if p.grad is not None)
  return dict(params=n_params, fwd_ms=fwd_ms, fwdbwd_ms=bwd_ms, peak_fwd_mb=peak_fwd,
              peak_mb=_peak_mb() - base, xla_temp_mb=None)


# --------------------------------------------------------------------------------------------
# Driver.


def _child(args) -> None:
  # PyTorch's allocator: glibc's defaults, or the malloc settings importing jaxmed sets
  # (jaxmed/_malloc.py; the jax side gets them from its own import, as users do).
  if args.side == "torch" and args.malloc == "jaxmed":
    from jaxmed import _malloc  # pylint: disable=g-import-not-at-top
    if not _malloc.apply_malloc_defaults({}):
      raise RuntimeError("jaxmed's malloc settings were not applied (not glibc?)")
  if args.side == "jax":
    out = run_jax(args.case, args.repeats)
  else:
    out = run_torch(args.case, args.repeats, args.threads)
  print("RESULT " + json.dumps(out))


def _spawn(case: str, side: str, repeats: int, threads: int, malloc: str = "glibc") -> dict:
  cmd = [sys.executable, __file__, "--child", "--case", case, "--side", side,
         "--repeats", str(repeats), "--threads", str(threads), "--malloc", malloc]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{case}/{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default=",".join(CASES))
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--torch-malloc", default="both", choices=("glibc", "jaxmed", "both"),
                      help="PyTorch's allocator settings: glibc's defaults (as PyTorch runs "
                           "unless told otherwise), jaxmed's (jaxmed/_malloc.py), or both rows")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--case", help=argparse.SUPPRESS)
  parser.add_argument("--side", help=argparse.SUPPRESS)
  parser.add_argument("--malloc", default="glibc", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(args)
    return
  torch_mallocs = ("glibc", "jaxmed") if args.torch_malloc == "both" else (args.torch_malloc,)
  rows = []
  for case in args.only.split(","):
    if case not in CASES:
      raise SystemExit(f"--only: unknown case {case!r}; choose from {CASES}")
    refs = {}
    for malloc in torch_mallocs:
      refs[malloc] = _spawn(case, "torch", args.repeats, args.threads, malloc)
      print(f"{case}: torch, {malloc} malloc {refs[malloc]}", flush=True)
      time.sleep(0.5)
    ours = _spawn(case, "jax", args.repeats, args.threads)
    print(f"{case}: jaxmed {ours}", flush=True)
    for malloc, ref in refs.items():
      if ref["params"] != ours["params"]:
        raise RuntimeError(f"{case}: parameter counts differ: torch {ref['params']:,} vs "
                           f"jaxmed {ours['params']:,}")
      rows.append((case, malloc, ref, ours))

  print("\n| model | params | PyTorch malloc | forward ms (torch / jaxmed, ratio) | "
        "forward+backward ms (torch / jaxmed, ratio) | peak MB fwd+bwd (torch / jaxmed, ratio) "
        "| XLA temp MB |")
  print("|---|---|---|---|---|---|---|")
  for case, malloc, ref, ours in rows:
    temp = f"{ours['xla_temp_mb']:.0f}" if ours["xla_temp_mb"] is not None else "-"
    print(f"| {case} | {ours['params']:,} | {malloc} | {ref['fwd_ms']:.0f} / "
          f"{ours['fwd_ms']:.0f}, {ref['fwd_ms'] / ours['fwd_ms']:.2f}x | {ref['fwdbwd_ms']:.0f} / "
          f"{ours['fwdbwd_ms']:.0f}, {ref['fwdbwd_ms'] / ours['fwdbwd_ms']:.2f}x | "
          f"{ref['peak_mb']:.0f} / {ours['peak_mb']:.0f}, "
          f"{ref['peak_mb'] / max(ours['peak_mb'], 1.0):.2f}x | {temp} |")


if __name__ == "__main__":
  main()
