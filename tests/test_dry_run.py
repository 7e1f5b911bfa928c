"""The dry-run memory plan against what the trainer really allocates (tiny MMDiT, 8 devices), and
against the VAE and text encoder a tiny SD pipeline really loads."""
import os

import jax
import numpy as np
import pytest

from configs import common
from configs import sharding as sharding_configs
from grasp_jax.inference import latents
from grasp_jax.models.text import encoders
from grasp_jax.run import dry_run
from grasp_jax.parallel import sharding
from grasp_jax.trainer import loop
import test_conditioning  # Its tiny pipeline fabricator (torch + diffusers).

BATCH = 16


def _config(batch=BATCH, remat=False, method="grasp", accum=1, frozen_dtype="float32"):
  c = common.base_config()
  c.model.backbone, c.diffusion.objective = "dit", "flow"
  c.model.base = {"num_layers": 1, "sample_size": 16, "pos_embed_max_size": 4}
  c.model.remat = remat
  c.model.frozen_dtype = frozen_dtype
  c.method = common.method_config(method, num_clusters=4, rank=4)
  c.data.image_size, c.data.batch_size, c.text.max_length = 16, batch, 4
  c.train.ema_decay = 0.999
  c.train.grad_accum_steps = accum
  c.mesh.data, c.mesh.fsdp, c.mesh.rules = 2, 4, sharding_configs.fsdp_rules()
  return c


def _device0_bytes(tree):
  """Bytes the arrays of `tree` really occupy on the first device."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


@pytest.fixture(scope="module")
def planned_and_real():
  config = _config(accum=2, frozen_dtype="bfloat16")
  mesh = sharding.make_mesh(config.mesh)
  planned = dry_run.plan(config, mesh)
  exp = dry_run.abstract_experiment(config)
  rng = np.random.default_rng(0)
  batch = {k: rng.normal(size=x.shape).astype(x.dtype) if x.dtype == np.float32 else
           np.zeros(x.shape, x.dtype) for k, x in dry_run.abstract_batch(config, exp, BATCH).items()}
  trainer = loop.setup(exp, config, mesh, batch)
  return planned, trainer, sharding.put_batch(batch, mesh)


def test_rows_equal_allocated_bytes(planned_and_real):
  planned, trainer, batch = planned_and_real
  rows = {r.name: r.device_bytes for r in planned.rows}
  s = trainer.state
  assert rows["frozen backbone parameters"] == _device0_bytes(trainer.frozen)
  dtypes = {r.name: r.dtype for r in planned.rows}
  assert dtypes["frozen backbone parameters"] == "bfloat16"
  assert dtypes["trainable parameters"] == "float32"
  assert dtypes["optimizer state"] == "float32/int32"  # Adam's moments and step count.
  assert rows["trainable parameters"] == _device0_bytes(s.params)
  assert rows["optimizer state"] == _device0_bytes(s.opt_state)
  assert rows["EMA of trainables"] == _device0_bytes(s.ema)
  assert rows["batch"] == _device0_bytes(batch)
  # FSDP really divides: the parameters take well under half of their size on one device.
  assert rows["trainable parameters"] < 0.5 * dry_run.global_bytes(s.params)
  assert rows["frozen backbone parameters"] < 0.5 * dry_run.global_bytes(trainer.frozen)


def test_xla_arguments_equal_allocated_inputs(planned_and_real):
  planned, trainer, batch = planned_and_real
  # jit drops the arguments the step does not use: the label, and the last joint block's
  # add_q_proj (its context queries feed only the context output SD3's last block discards).
  used = {k: v for k, v in batch.items() if k != "label"}
  block = trainer.frozen["transformer_blocks_0"]
  attn = {k: v for k, v in block["attn"].items() if k != "add_q_proj"}
  frozen = {**trainer.frozen, "transformer_blocks_0": {**block, "attn": attn}}
  assert planned.xla["argument"] == _device0_bytes((trainer.state, frozen, used))
  assert planned.xla["alias"] == _device0_bytes(trainer.state)  # The donated state.
  assert planned.flops_per_device > 0


def test_activations_scale_with_micro_batch_and_shrink_with_remat():
  mesh = sharding.make_mesh(_config().mesh)
  act = lambda config: {r.name: r for r in dry_run.plan(config, mesh, compile_step=False).rows}[
      "activations for backward (est.)"]
  base, double = act(_config()), act(_config(batch=2 * BATCH))
  assert base.device_bytes > 0 and double.device_bytes == 2 * base.device_bytes
  assert base.global_bytes == base.device_bytes * 8  # Batch split over data x fsdp = 8.
  assert act(_config(batch=2 * BATCH, accum=2)).device_bytes == base.device_bytes
  assert act(_config(remat=True)).device_bytes < base.device_bytes


def test_table_lists_every_row(planned_and_real):
  planned, _, _ = planned_and_real
  text = dry_run.format_table(planned)
  for row in planned.rows:
    assert row.name in text
  assert "mesh data=2 x fsdp=4" in text and "XLA" in text
  assert "2 micro-batches of 8 (1/device)" in text and "frozen params bfloat16" in text


def test_latent_pipeline_counts_vae_and_text_encoder(tmp_path):
  """A latent config (a tiny SD pipeline): the step's batch is VAE latents, and the VAE and text
  encoder rows are the bytes of the ones `latents.load_codec` / `encoders` really load."""
  folder = str(tmp_path / "sd")
  test_conditioning.save_tiny_pipeline(folder, "sd")
  c = common.base_config()
  c.model.pretrained, c.text.encoder, c.model.frozen_dtype = folder, "pipeline", "bfloat16"
  c.method = common.method_config("grasp", num_clusters=4, rank=4)
  size = test_conditioning.IMAGE_SIZE
  c.data.image_size, c.data.channels, c.data.batch_size = size, 3, BATCH
  c.train.grad_accum_steps = 2
  planned = dry_run.plan(c, sharding.make_mesh(c.mesh), compile_step=False)
  rows = {r.name: r for r in planned.rows}
  vae = latents.load_codec(os.path.join(folder, "vae"), param_dtype="bfloat16")
  clip = encoders.load_clip_text_encoder(os.path.join(folder, "text_encoder"),
                                         param_dtype="bfloat16")
  for name, real in (("VAE", vae.params_on(None)), ("text encoder text_encoder", clip.params)):
    leaves = jax.tree.leaves(real)
    assert {x.dtype for x in leaves} == {np.dtype("bfloat16")}
    assert rows[name].count == sum(x.size for x in leaves)
    assert rows[name].device_bytes == rows[name].global_bytes == sum(x.nbytes for x in leaves)
  latent = (size // 8, size // 8, 4)  # The tiny VAE downsamples by 8 into 4 channels.
  image_bytes = BATCH * np.prod(latent) * 4
  label_bytes = 2 * BATCH * 4
  cond_bytes = BATCH * (77 + 1) * 32 * 4  # CLIP context [77, 32] + pooled [32], float32.
  assert rows["batch"].global_bytes == image_bytes + label_bytes + cond_bytes
  assert f"input {latent}" in planned.title
