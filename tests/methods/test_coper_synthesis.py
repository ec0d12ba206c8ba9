"""pix2pix + L1 + CoPer + adversarial synthesis (coper_contrastive_perceptual_metric Eq. 5)."""

import os
import runpy
import shutil

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import REPO, config_for

from jaxmed.config import load_sweep
from jaxmed.losses import l1_loss
from jaxmed.methods import METHODS, CoPerSynthesisMethod, get_method
from jaxmed.methods.loss_network import network_variables
from jaxmed.methods.coper_synthesis import PIX2PIX_LAMBDA2
from jaxmed.models import VGG16
from jaxmed.runner import run_config
from jaxmed.train import checkpoint, sharding, trainer
from jaxmed.train import init as init_lib
from jaxmed.train.logging import read_metrics

# Tiny networks on 32 x 32 slices: a 5-level U-Net with 4 filters, a 1-layer PatchGAN, a
# 1/16-width VGG-16-BN read at relu1_2 and relu2_2.
TINY = {
    "generator.num_downs": 5, "generator.ngf": 4, "discriminator.ndf": 4,
    "discriminator.n_layers": 1, "loss_net.taps": ("relu1_2", "relu2_2"),
    "synthesis.image_size": 0, "batch_size": 4, "data.shape": (16, 32, 32),
    "data.num_subjects": 4, "data.num_val": 1, "data.num_test": 1, "tensorboard": False,
    "loss.lambda2": 1.0,  # so that the adversarial gradient is not negligible
    **({"loss_net.model.width": 1 / 16} if "width" in VGG16.__dataclass_fields__ else {}),
}
BATCH = {"image": np.random.default_rng(0).uniform(0, 1, size=(4, 32, 32, 3)).astype(np.float32)}
FLAT = lambda tree: flax.traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _config(**overrides):
  return config_for("coper_synthesis", {**TINY, **{k.replace("__", "."): v
                                                   for k, v in overrides.items()}})


def _assert_trees_equal(a, b):
  a, b = FLAT(a), FLAT(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def setup():
  """The train state at step 0 and the jitted step of the tiny config, on its mesh (the 4
  simulated devices, as `run_config` uses: the compiled step is shared through the cache)."""
  config = _config()
  method = get_method(config)
  mesh = sharding.make_mesh(config.mesh)
  state, step, _ = trainer.setup(config, method, BATCH, mesh)
  return method, jax.device_get(state), state, step, mesh


def test_update_steps_the_discriminator_then_the_generator_against_the_updated_one(setup):
  method, s0, state, step, mesh = setup
  assert isinstance(method, CoPerSynthesisMethod) and METHODS["coper_synthesis"] is type(method)
  assert set(s0.opt_state) == {"generator", "discriminator"}  # the loss network: frozen
  assert "loss_net" in s0.params and s0.optimizer.assign(s0.params)["loss_net"]
  new, metrics = step(state, sharding.global_batch(BATCH, mesh))
  new = jax.device_get(new)

  # By hand: the step's keys, G(X) once, D's Adam step on the detached fake, then G's gradient
  # of Eq. 5 through the updated D (and, for comparison, through the D before its update).
  p0, ms0 = s0.params, s0.model_state
  adam = optax.adam(2e-4, b1=0.5)

  @jax.jit
  def by_hand(key):
    prep_key, gen_key = jax.random.split(key)
    x, y = method.prepare(BATCH, prep_key)

    def generate(g_params):
      return method._generate({"params": {**p0, "generator": g_params}, **ms0}, x, train=True,
                              key=gen_key)[0]

    fake = generate(p0["generator"])
    d_grad = jax.grad(lambda d: method.discriminator_loss(
        {"params": {**p0, "discriminator": d}, **ms0}, x, y, fake, train=True)[0])(
            p0["discriminator"])
    d_new = optax.apply_updates(
        p0["discriminator"], adam.update(d_grad, adam.init(p0["discriminator"]))[0])

    def g_grad(discriminator):
      params = {**p0, "discriminator": discriminator}
      return jax.grad(lambda g: method.generator_loss(
          {"params": params, **ms0}, x, y, generate(g), train=True)[0])(p0["generator"])

    return d_grad, d_new, g_grad(d_new), g_grad(p0["discriminator"])

  d_grad, d_new, g_fresh, g_stale = jax.device_get(by_hand(jax.random.fold_in(s0.rng, 0)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new.params["discriminator"], d_new)
  np.testing.assert_allclose(metrics["grad_norm_d"], optax.tree.norm(d_grad), rtol=1e-4)
  np.testing.assert_allclose(metrics["grad_norm_g"], optax.tree.norm(g_fresh), rtol=1e-4)
  # Against the discriminator before its update the generator's gradient would differ.
  assert not np.isclose(metrics["grad_norm_g"], optax.tree.norm(g_stale), rtol=1e-4)
  stale, fresh = FLAT(g_stale), FLAT(g_fresh)
  assert any(not np.allclose(stale[k], fresh[k], rtol=1e-3, atol=1e-7) for k in fresh)
  # Adam's first step is -lr g / (|g| + eps): the generator moved along the fresh gradient.
  delta = FLAT(jax.tree.map(np.subtract, new.params["generator"], p0["generator"]))
  fresh_leaves = FLAT(g_fresh)
  assert np.mean(np.concatenate([np.abs(g).ravel() > 1e-6 for g in fresh_leaves.values()])) > 0.5
  for k, g in fresh_leaves.items():
    big = np.abs(g) > 1e-6
    np.testing.assert_array_equal(np.sign(delta[k][big]), -np.sign(g[big]), err_msg=k)
    np.testing.assert_allclose(np.abs(delta[k][np.abs(g) > 1e-4]), 2e-4, rtol=1e-2, err_msg=k)

  # The loss network (params and running statistics) is untouched; the others' stats moved.
  _assert_trees_equal(network_variables(new.variables, "loss_net"),
                      network_variables(s0.variables, "loss_net"))
  moved = lambda s: FLAT(s.model_state["batch_stats"]["generator"])["down_1/norm/bn/mean"]
  assert not np.allclose(moved(new), moved(s0))
  assert {"loss_d", "loss_g", "l1", "coper", "adv", "d_real", "d_fake", "grad_norm",
          "lr/generator", "lr/discriminator"} <= set(metrics)
  np.testing.assert_allclose(metrics["loss"], metrics["loss_g"] + metrics["loss_d"], rtol=1e-6)

  # Deterministic per seed: the same initial state, and the same parameters after two steps.
  again, _, _ = trainer.setup(method.config, method, BATCH, mesh)
  _assert_trees_equal(jax.device_get(again.variables), s0.variables)
  twice = []
  for _ in range(2):
    state = jax.device_put(s0)
    for _ in range(2):
      state, _ = step(state, sharding.global_batch(BATCH, mesh))
    twice.append(jax.device_get(state.params))
  _assert_trees_equal(*twice)


def test_eq5_terms_and_lambda1_one_lambda2_zero_is_l1(setup):
  method, s0, *_ = setup
  x, y = method.prepare(BATCH)
  fake = method.generate(s0.variables, x)

  def terms(m, fake):
    loss, (metrics, _) = m.generator_loss(s0.variables, x, y, fake, train=True)
    return loss, metrics

  loss, metrics = jax.jit(lambda f: terms(method, f))(fake)  # lambda1 0.70 (tumour), lambda2 1
  assert float(metrics["coper"]) > 0 and float(metrics["adv"]) > 0
  np.testing.assert_allclose(
      loss, 0.7 * metrics["l1"] + 0.3 * metrics["coper"] + 1.0 * metrics["adv"], rtol=1e-6)

  l1_only = get_method(_config(loss__lambda1=1.0, loss__lambda2=0.0))
  loss, metrics = terms(l1_only, fake)
  assert float(loss) == float(l1_loss(fake, y)) == float(metrics["l1"])
  assert float(metrics["coper"]) > 0  # still reported
  # ... and its gradient is that of L1 alone: no CoPer or adversarial gradient leaks in.
  grad = jax.jit(jax.grad(lambda f: terms(l1_only, f)[0]))(fake)
  np.testing.assert_allclose(grad, jax.jit(jax.grad(l1_loss))(fake, y), rtol=1e-6, atol=1e-9)


def test_no_gradient_reaches_the_loss_network(setup):
  method, s0, *_ = setup
  x, y = method.prepare(BATCH)
  fake = method.generate(s0.variables, x)

  def loss(params, fake):
    return method.generator_loss({"params": params, **s0.model_state}, x, y, fake,
                                 train=True)[0]
  g_params, g_fake = jax.jit(jax.grad(loss, argnums=(0, 1)))(s0.params, fake)
  assert all(np.all(v == 0) for v in FLAT(g_params["loss_net"]).values())
  assert np.abs(np.asarray(g_fake)).sum() > 0
  # Through the loss network alone (lambda2 = 0 would leave only L1 + CoPer): the CoPer part
  # of the output gradient is nonzero.
  no_adv = get_method(_config(loss__lambda2=0.0, loss__lambda1=0.0))
  g_coper = jax.jit(jax.grad(
      lambda f: no_adv.generator_loss(s0.variables, x, y, f, train=False)[0]))(fake)
  assert np.abs(np.asarray(g_coper)).sum() > 0


def test_prepare_normalises_jitters_and_flips():
  method = get_method(_config(synthesis__flip_p=1.0))
  image = BATCH["image"]
  x, y = method.prepare(BATCH)
  # "fixed": intensity_range (0, 1) -> [-1, 1]; tumour: inputs flair, t1 -> target t2, in the
  # order of data.modalities ("flair", "t1", "t2").
  np.testing.assert_allclose(x, image[..., :2] * 2 - 1, atol=1e-6)
  np.testing.assert_allclose(y, image[..., 2:] * 2 - 1, atol=1e-6)
  np.testing.assert_allclose(method.denormalize(y), image[..., 2:], atol=1e-6)
  # Training: resized 32 -> 36 (x 286 / 256), cropped back to 32, flipped left-right (p = 1).
  xt, yt = method.prepare(BATCH, jax.random.PRNGKey(0))
  assert xt.shape == (4, 32, 32, 2) and yt.shape == (4, 32, 32, 1)
  assert float(jnp.min(xt)) >= -1 and float(jnp.max(xt)) <= 1
  no_jitter = get_method(_config(synthesis__flip_p=1.0, synthesis__load_scale=1.0))
  xf, _ = no_jitter.prepare(BATCH, jax.random.PRNGKey(0))
  np.testing.assert_allclose(xf, x[:, :, ::-1], atol=1e-6)
  # "slice": every slice and channel spans [-1, 1]; image_size resizes for evaluation.
  per_slice = get_method(_config(synthesis__normalize="slice", synthesis__image_size=64))
  xs, ys = per_slice.prepare(BATCH)
  assert xs.shape == (4, 64, 64, 2)
  np.testing.assert_allclose(jnp.max(ys, axis=(1, 2)), 1.0, atol=1e-2)
  with pytest.raises(ValueError, match="denormalize needs"):
    per_slice.denormalize(ys)


def test_generate_and_synthesize_are_eval_mode(setup):
  method, s0, *_ = setup
  x, _ = method.prepare(BATCH)
  out = method.generate(s0.variables, x)
  assert out.shape == (4, 32, 32, 1) and float(jnp.max(jnp.abs(out))) <= 1
  np.testing.assert_array_equal(out, method.generate(s0.variables, x))  # no dropout
  np.testing.assert_allclose(method.generate(s0.variables, x[:1]), out[:1], atol=1e-6)  # stats
  np.testing.assert_allclose(method.synthesize(s0.variables, BATCH["image"]), out, atol=1e-6)
  inputs, pred = method.reconstruct(s0.variables, BATCH, None)
  np.testing.assert_array_equal(inputs, x)
  np.testing.assert_array_equal(pred, out)


def test_run_config_checkpoints_resumes_and_keeps_the_loss_network(tmp_path):
  config = _config(total_steps=4, log_every=2, checkpoint__every=2, checkpoint__async_save=False)
  with config.unlocked():
    config.evals.recon = dict(type="reconstruction", every=0, split="val", num_slices=4,
                              data_range=2.0, min_foreground=0.1)
  workdir = str(tmp_path / "run")
  full = run_config(config, workdir, progress=False)
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [2, 4]
  assert np.isfinite(records[-1]["recon/psnr"]) and 0 < records[-1]["recon/ssim"] <= 1
  assert records[-1]["loss_d"] > 0 and records[-1]["coper"] > 0

  # The loss network never changes: bit for bit the same at steps 2 and 4 (the seeded random
  # network, up to the compiler's rounding of its initialisers).
  at2 = checkpoint.load_variables(workdir, step=2)
  at4 = checkpoint.load_variables(workdir, step=4)
  _assert_trees_equal(network_variables(at2, "loss_net"), network_variables(at4, "loss_net"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               network_variables(at4, "loss_net"), full.method.loss_net_variables())
  assert not np.array_equal(at2["params"]["generator"]["down_0"]["conv"]["kernel"],
                            at4["params"]["generator"]["down_0"]["conv"]["kernel"])

  # Resumed from step 2 (the step-4 checkpoint removed): the same parameters and statistics.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  resumed = run_config(_config(total_steps=4, checkpoint__every=2), workdir, progress=False)
  _assert_trees_equal(resumed.state.params, full.state.params)
  _assert_trees_equal(resumed.state.model_state, full.state.model_state)

  # That run as a loss network: found under its "loss_net" module without a prefix.
  pretrained = get_method(_config(loss_net__source="pretrained", loss_net__path=workdir))
  with pytest.raises(ValueError, match="loaded by the trainer"):  # not read by the method
    pretrained.loss_net_variables()
  init_lib.load_frozen_networks(pretrained)
  _assert_trees_equal(pretrained.loss_net_variables(), network_variables(at4, "loss_net"))
  with pytest.raises(ValueError, match="no module holds the network"):  # other shapes
    init_lib.load_frozen_networks(get_method(_config(
        loss_net__source="pretrained", loss_net__path=workdir,
        **{"loss_net.model.width": 1 / 8})))


def test_the_initialisation_takes_the_loss_network_as_an_argument():
  """Runs that differ only in their loss network's weights share one initialisation program
  (`trainer.make_programs`: the frozen networks are its argument, not constants), and each
  state holds its own network; the method keeps the loaded one (not a tracer)."""
  method = get_method(_config(loss_net__source="pretrained", loss_net__path="vgg.safetensors"))
  shapes = method.frozen_networks()["loss_net"][1]
  nets = [jax.tree.map(lambda s, v=v: np.full(s.shape, v, s.dtype), shapes) for v in (0.5, 2.0)]
  method.set_frozen_network("loss_net", nets[0])  # as `load_frozen_networks` leaves it
  programs = trainer.make_programs(method.config, method, BATCH,
                                   sharding.make_mesh({"num_devices": 1}), {"loss_net": nets[0]})
  for net in (nets[1], nets[0]):
    state = jax.device_get(programs.init(jax.random.PRNGKey(0), {"loss_net": net}))
    _assert_trees_equal(network_variables(state.variables, "loss_net"), net)
  _assert_trees_equal(method.loss_net_variables(), nets[0])


def test_loss_network_from_a_pytorch_file(tmp_path):
  """A torchvision-layout VGG-16-BN state dict (written here) converted into the loss network."""
  from safetensors import numpy as safetensors  # pylint: disable=g-import-not-at-top
  from jaxmed.interop.vgg import vgg16_torch_prefixes  # pylint: disable=g-import-not-at-top
  method = get_method(_config())
  reference = jax.device_get(method.loss_net_variables())
  params, stats = FLAT(reference["params"]), FLAT(reference["batch_stats"])
  prefixes = vgg16_torch_prefixes(batch_norm=True)
  state_dict = {}
  for path, value in params.items():
    module, leaf = path.split("/")
    torch_name = prefixes[module]
    if module.startswith("conv"):
      state_dict[f"{torch_name}.{'weight' if leaf == 'kernel' else 'bias'}"] = (
          np.transpose(value, (3, 2, 0, 1)) if leaf == "kernel" else value)
    else:
      state_dict[f"{torch_name}.{'weight' if leaf == 'scale' else 'bias'}"] = value
  for path, value in stats.items():
    module, leaf = path.split("/")
    state_dict[f"{prefixes[module]}.running_{'mean' if leaf == 'mean' else 'var'}"] = value
  state_dict = {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}
  path = str(tmp_path / "vgg16_bn.safetensors")
  safetensors.save_file(state_dict, path)
  converted = get_method(_config(loss_net__source="pretrained", loss_net__path=path,
                                 loss_net__converter="vgg16"))
  init_lib.load_frozen_networks(converted)
  _assert_trees_equal(converted.loss_net_variables(), reference)


def test_find_prefix():
  template = {"params": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)}}}
  run = {"params": {"backbone": {"conv": {"kernel": np.zeros((3, 3, 3, 4))}},
                    "head": {"conv": {"kernel": np.zeros((3, 3, 3, 2))}}}}
  assert init_lib.find_prefix(run, template, "run") == "backbone"
  run["params"]["ema"] = run["params"]["backbone"]
  with pytest.raises(ValueError, match="several modules"):
    init_lib.find_prefix(run, template, "run")
  with pytest.raises(ValueError, match="no module holds"):
    init_lib.find_prefix({"params": {"head": run["params"]["head"]}}, template, "run")


def test_bad_config_is_an_error_at_construction():
  with pytest.raises(ValueError, match=r"not in data.modalities"):
    get_method(_config(synthesis__targets=("t1ce",)))
  with pytest.raises(ValueError, match="distinct"):
    get_method(_config(synthesis__targets=("t1",)))
  with pytest.raises(ValueError, match="lambda1=1"):
    get_method(_config(loss_net__source="none"))
  with pytest.raises(ValueError, match="needs loss_net.path"):
    get_method(_config(loss_net__source="pretrained"))
  with pytest.raises(ValueError, match="frozen group exactly when"):
    get_method(_config(loss_net__source="none", loss__lambda1=1.0))  # group still there
  with pytest.raises(ValueError, match="lambda1 must be in"):
    get_method(_config(loss__lambda1=1.5))
  with pytest.raises(ValueError, match="synthesis.normalize"):
    get_method(_config(synthesis__normalize="volume"))


def test_config_file_and_sweep():
  path = os.path.join(REPO, "jaxmed", "configs", "coper_synthesis.py")
  get_config = runpy.run_path(path)["get_config"]
  c = get_config("size=small")
  assert (c.method, c.synthesis.inputs, c.synthesis.targets) == (
      "coper_synthesis", ("flair", "t1"), ("t2",))
  assert (c.loss.lambda1, c.loss.lambda2, c.loss_net.source) == (0.70, PIX2PIX_LAMBDA2, "random")
  assert (c.optim.name, c.optim.lr, c.optim.b1, c.optim.schedule) == ("adam", 2e-4, 0.5,
                                                                       "constant")
  assert c.param_groups.loss_net.frozen and c.data.min_foreground == 0.1
  assert (c.generator.num_downs, c.discriminator.n_layers, c.data.shape) == (6, 2, (40, 64, 64))
  full = get_config("")
  assert (full.batch_size, full.synthesis.image_size, full.generator.num_downs,
          full.discriminator.n_layers) == (1, 256, 8, 3)
  ms = get_config("task=ms,loss_net=none,size=small")
  assert (ms.synthesis.inputs, ms.synthesis.targets, ms.data.pathology) == (
      ("t1", "t2"), ("flair",), "wmh")
  assert ms.loss.lambda1 == 1.0 and "loss_net" not in ms.param_groups
  assert isinstance(get_method(ms), CoPerSynthesisMethod)
  assert get_config("task=ms").loss.lambda1 == 0.55
  assert get_config("lambda2=paper").loss.lambda2 == 10.0
  assert get_config("lambda1=0.4,lambda2=0.1").loss.lambda1 == 0.4
  torch = get_config("loss_net=/weights/vgg16.pth,loss_arch=vgg16")
  assert (torch.loss_net.source, torch.loss_net.converter, torch.loss_net.model.batch_norm,
          torch.loss_net.preprocess) == ("pretrained", "vgg16", False, "imagenet")
  run = get_config("loss_net=runs/swav,loss_arch=resnet18,size=small")
  assert (run.loss_net.path, run.loss_net.converter, run.loss_net.model.name,
          run.loss_net.model.depth, run.loss_net.preprocess) == (
              "runs/swav", "", "resnet", 18, "swav")
  assert len(load_sweep(f"{path}:task=tumour")) == 11
  for bad in ("task=brats", "loss_arch=vit", "lambda2=ten", "lamda1=0.5"):
    with pytest.raises(ValueError):
      get_config(bad)
