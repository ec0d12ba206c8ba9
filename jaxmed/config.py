"""Experiment configs: the base fields, method-owned sections, loading and overrides.

A config is the small base (run, optim, param groups, data, mesh, checkpoint, logging, init,
evals) plus the sections the method declares (`Method.default_config`: ``model``, ``pretext``,
loss weights ...), locked, so a misspelt field anywhere is an error:

    config = method_config("restoration")                       # base + the method's sections
    config = load_config("si:strategy=within", {"total_steps": 50})
    config = load_config("path/to/my_config.py:size=small")

`load_config` takes a config file's path, or the bare name of a config shipped with the package
(``jaxmed/configs/<name>.py``), optionally followed by ``:arg`` for its ``get_config(arg)``.
The open-ended sections (``evals``, ``param_groups``) take new entries explicitly, e.g.
``with config.unlocked(): config.evals.val = dict(type="segmentation", every=500)``. The CLI
(`jaxmed.cli`) only parses flags; everything else lives here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import ml_collections

from jaxmed.data.synthetic import MODALITIES

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def base_config() -> ml_collections.ConfigDict:
  """The fields every config has (unlocked; `method_config` adds a method's and locks)."""
  c = ml_collections.ConfigDict()
  c.method = ""
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 16            # global batch, split over all devices
  c.log_every = 50
  c.eval_every = 0             # 0: evaluate only at the end (hooks and evaluators)
  c.max_nonfinite = 10         # abort after this many skipped non-finite steps in a row
  c.tensorboard = True

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=0))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))

  # The default optimizer; methods add named groups in `param_groups` (jaxmed.train.optim).
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=1e-2, schedule="poly", poly_power=0.9, warmup_steps=0, end_lr=0.0,
      momentum=0.99, nesterov=True, b1=0.9, b2=0.999, eps=1e-8, weight_decay=3e-5,
      grad_clip=12.0, accum_steps=1))
  c.param_groups = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict(dict(
      source="auto", root="", modalities=MODALITIES, seg="seg", pattern="",
      pathology="tumour", num_subjects=24, shape=(64, 64, 64), noise=0.03, crop=(), seed=0,
      num_val=2, num_test=6, min_foreground=0.2,
      # What a training example is (jaxmed.data.views): "slice" (axial slices with
      # >= min_foreground brain), "volume" (whole volumes) or "crop" (random crop_size crops);
      # fg_fraction of the slices / crops contain (are centred on) a labelled voxel; negative
      # crops are placed "random"ly (nnU-Net) or centred on "background" (MONAI); per_modality
      # makes every channel its own example, tagged with its modality id.
      view="slice", crop_size=(64, 64, 64), fg_fraction=0.0, negative="random",
      per_modality=False,
      # NIfTI / TFDS cases are preprocessed once into cache_dir (jaxmed.data.cache): resampled
      # to `spacing` (mm, () keeps it), cropped to the foreground, normalised ("zscore",
      # "window" for CT, "none"), cropped / padded to `crop`; unreadable cases raise or are
      # skipped (on_error). Training reads them on demand with read_threads, prefetch batches.
      # The foreground (brain mask) is where some channel is "nonzero" (skull-stripped MR) or
      # > foreground_threshold ("threshold", e.g. -500 HU for the body in CT).
      spacing=(), crop_foreground=False, normalize="zscore", window=(-175.0, 250.0),
      foreground="nonzero", foreground_threshold=-500.0, cache_dir="", on_error="raise",
      preprocess_workers=0,
      read_threads=4, prefetch=4))
  # A TFDS dataset (jaxmed.data.tfds: brats, wmh, btcv, feta, fastmri) prepared in data_dir,
  # from the downloaded official layout in manual_dir on first use.
  c.data.tfds = ml_collections.ConfigDict(dict(name="", config="", split="train", data_dir="",
                                               manual_dir=""))
  c.data.augment = ml_collections.ConfigDict(dict(
      enabled=False, flip=True, rot90=False, rotation=15.0, scale=(0.85, 1.25), affine_p=0.2,
      elastic_alpha=0.0, elastic_sigma=3.0, elastic_p=0.2, gamma=(0.7, 1.5), gamma_p=0.3,
      noise_std=0.0, noise_p=0.15,
      # MONAI RandScaleIntensity / RandShiftIntensity: image * (1 + U(-f, f)), image + U(-o, o).
      intensity_scale=0.0, intensity_scale_p=0.1, intensity_shift=0.0, intensity_shift_p=0.1))

  # Starting weights (jaxmed.train.init.initializer): a run's workdir / checkpoint folder (at
  # `step`, default the latest readable), or a PyTorch file read with `converter`; `prefix`
  # takes one module's subtree; leaves whose path matches a `replace` pattern keep their fresh
  # values, `drop` names pre-trained leaves left unused, `rename` maps paths.
  # `tile` names input kernels tiled over input channels (x C_old / C_new) when the counts differ.
  c.init = ml_collections.ConfigDict(dict(
      path="", step=None, prefix="", converter="", converter_kwargs=None, key="", strip=(),
      replace=(), tile=(), drop=(), rename=(), strict=True))
  # Evaluators by name (jaxmed.evaluate.evaluators): name -> dict(type=..., every=..., ...).
  c.evals = ml_collections.ConfigDict()
  return c


def method_config(name: str) -> ml_collections.ConfigDict:
  """The base config with method ``name``'s sections merged in, locked.

  A method's section that the base also has (``optim``, ``data``) overrides those fields and
  may not add new ones; other sections are the method's own.
  """
  from jaxmed import methods  # pylint: disable=g-import-not-at-top
  if name not in methods.METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {sorted(methods.METHODS)}")
  c = base_config()
  c.method = name
  for section, fields in methods.METHODS[name].default_config().items():
    fields = dict(fields)
    if section in c and isinstance(c[section], ml_collections.ConfigDict) and len(c[section]):
      _update(c[section], fields, f"{name}.default_config()['{section}']")
    else:
      c[section] = ml_collections.ConfigDict(fields)
  c.lock()
  return c


def set_model(config: ml_collections.ConfigDict, name: str, **fields) -> ml_collections.ConfigDict:
  """Replaces ``config.model`` with registered model ``name``'s section: its optional arguments
  at their defaults (`jaxmed.models.registry.model_defaults`), ``fields`` over them, less the
  arguments the method derives itself (``Method.derived_model_fields``: e.g. a UNet method's
  ``out_channels`` and ``spatial_dims``). The section is locked like the rest, so a field the
  model does not have is an error here, not when the model is built.

      config = method_config("segmentation")
      set_model(config, "swin_unetr", feature_size=12)   # Swin-UNETR instead of the UNet

  Returns ``config`` (changed in place).
  """
  # pylint: disable=g-import-not-at-top
  from jaxmed import methods
  from jaxmed.models.registry import model_arguments, model_defaults
  # pylint: enable=g-import-not-at-top
  derived = set(getattr(methods.METHODS.get(config.get("method", "")), "derived_model_fields",
                        ()))
  known = set(model_arguments(name)) - derived
  unknown = sorted(set(fields) - known - {"name"})
  if unknown:
    raise ValueError(f"set_model: model {name!r} has no field(s) {unknown} a config sets "
                     f"(derived by the method: {sorted(derived)}); its fields: {sorted(known)}")
  section = {k: v for k, v in model_defaults(name).items() if k not in derived}
  section.update({k: v for k, v in fields.items() if k != "name"})
  with config.unlocked():
    config.model = ml_collections.ConfigDict({"name": name, **section})
  config.lock()
  return config


def _update(node, fields: dict, where: str) -> None:
  for key, value in fields.items():
    if key not in node:
      raise KeyError(f"{where}: no field {key!r} in this section ({sorted(node)})")
    if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _update(node[key], value, f"{where}.{key}")
    else:
      node[key] = value


def apply_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted-path overrides applied (unknown fields are an error)."""
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise KeyError(f"override {path!r}: no config section {p!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"override {path!r}: no such config field")
    node[leaf] = value
  return config


def has_field(config, field: str) -> bool:
  """Whether ``config`` has the dotted ``field`` (e.g. ``"model.depth"``)."""
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def apply_present_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
  """`apply_overrides` of those ``overrides`` whose field ``config`` has (the others skipped):
  an experiment script's ``--set`` across configs of different methods."""
  return apply_overrides(config, {f: v for f, v in overrides.items() if has_field(config, f)})


def parse_overrides(items) -> dict:
  """``{field: value}`` of ``FIELD=VALUE`` strings (an experiment script's ``--set`` flags), each
  value parsed as JSON where it can be (``model.depths=[1,1,1,1]``, ``optim.lr=1e-3``) and kept
  as a string otherwise (``model.downsample=merging``); for `apply_overrides`."""
  out = {}
  for item in items:
    field, sep, value = item.partition("=")
    if not sep or not field:
      raise ValueError(f"expected FIELD=VALUE; got {item!r}")
    try:
      out[field] = json.loads(value)
    except json.JSONDecodeError:
      out[field] = value
  return out


def resolve_config_path(spec: str) -> tuple[str, str]:
  """``(file path, arg)`` of ``--config path[:arg]`` or ``name[:arg]`` (a config shipped in
  ``jaxmed/configs``). An unknown name lists the shipped configs."""
  path, _, arg = spec.partition(":")
  if os.path.isfile(path):
    return path, arg
  if os.sep not in path and not path.endswith(".py"):
    shipped = os.path.join(CONFIG_DIR, f"{path}.py")
    if os.path.isfile(shipped):
      return shipped, arg
  raise FileNotFoundError(f"config {path!r} is neither a file nor a shipped config; shipped: "
                          f"{shipped_configs()}")


def shipped_configs() -> list[str]:
  """Names of the configs in ``jaxmed/configs``."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_"))


def _module(path: str):
  spec = importlib.util.spec_from_file_location(
      f"jaxmed_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config named by ``spec`` (``path[:arg]`` or ``name[:arg]``),
  with dotted-path ``overrides``."""
  path, arg = resolve_config_path(spec)
  config = _module(path).get_config(arg)
  return apply_overrides(config, overrides or {})


def load_sweep(spec: str) -> list[dict]:
  """``get_sweep(arg)`` of the config named by ``spec``: a list of override dicts."""
  path, arg = resolve_config_path(spec)
  module = _module(path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(arg)")
  sweep = module.get_sweep(arg)
  if not sweep:
    raise ValueError(f"{path}: get_sweep({arg!r}) returned no runs")
  return sweep


def parse_arg(arg: str, defaults: dict[str, str], *, config: str) -> dict[str, str]:
  """The ``key=value,...`` argument of a config file (``--config file.py:arg``) over
  ``defaults``; an unknown key, a missing ``=`` or a ``size`` other than '' / 'small' is an
  error naming ``config``."""
  args = dict(defaults)
  for kv in filter(None, arg.split(",")):
    key, sep, value = kv.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"{config} config arg must be key=value with key in {sorted(defaults)}; "
                       f"got {kv!r}")
    args[key] = value
  if args.get("size", "") not in ("", "small"):
    raise ValueError(f"size must be 'small' or absent; got {args['size']!r}")
  return args


def make_small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a 2D UNet config to a CPU-sized run (``size=small``): 200 steps, batch 16, a
  16-128 filter UNet, 12 phantoms of which 2 are held out."""
  c.total_steps = 200
  c.batch_size = 16
  c.model.features = (16, 32, 64, 128)
  c.log_every = 20
  c.data.num_subjects = 12
  c.data.num_test = 2
  return c


def make_small_3d(c: ml_collections.ConfigDict, total_steps: int = 200
                  ) -> ml_collections.ConfigDict:
  """Shrinks a 3D pre-training config to a CPU-sized run (``size=small``; changed in place and
  returned): ``total_steps`` steps of batch 8 with 5% of them warm-up, 32^3 crops of 64^3
  phantoms (12, of which 2 are held out for test), a log line every 20 steps, a checkpoint every
  100. The networks' sizes are the config's own."""
  c.total_steps = total_steps
  c.batch_size = 8
  c.log_every = 20
  c.checkpoint.every = 100
  c.data.num_subjects = 12
  c.data.num_test = 2
  c.data.shape = (64, 64, 64)
  c.data.crop_size = (32, 32, 32)
  c.optim.warmup_steps = total_steps // 20
  return c


def with_total_steps(config: ml_collections.ConfigDict, steps: int,
                     *, log_points: int = 10) -> ml_collections.ConfigDict:
  """``config`` (changed in place and returned) trained for ``steps``: its step-counted
  milestones (``optim.warmup_steps``, each parameter group's ``freeze_steps``, SwAV's
  ``swav.queue_start_step``) scaled by ``steps / config.total_steps`` (rounded down), and
  ``log_every`` set to log about ``log_points`` times."""
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"with_total_steps: steps must be an int >= 1; got {steps!r}")
  scale = steps / int(config.total_steps)
  config.optim.warmup_steps = int(config.optim.warmup_steps * scale)
  for group in config.get("param_groups", {}).values():
    if "freeze_steps" in group:
      group.freeze_steps = int(group.freeze_steps * scale)
  if "swav" in config:
    config.swav.queue_start_step = int(config.swav.queue_start_step * scale)
  config.total_steps = steps
  config.log_every = max(1, steps // int(log_points))
  return config
