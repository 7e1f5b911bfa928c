"""Shared config pieces: the config-string parser and the defaults every experiment starts from.

A config file's `get_config(arg)` calls `parse_arg(arg, key=default, ...)`, so
`--config=configs/mimic.py:backbone=dit,method=grasp` selects variants, and
`--config.train.steps=100` overrides single fields (unknown fields are rejected by the flag parser).
"""
import ml_collections as mlc

from grasp_jax.run.setup import METHODS


def parse_arg(arg, **defaults):
  """'a=1,b=x,smoke' -> ConfigDict with typed values; a bare word sets a bool default to True.

  Booleans take true/false, 1/0 or yes/no (any case) and nothing else.
  """
  booleans = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if (value.lower() if eq else "true") not in booleans:
        raise ValueError(f"config argument {key}={value!r}: expected one of {sorted(booleans)}")
      out[key] = booleans[value.lower() if eq else "true"]
    elif not eq:
      raise ValueError(f"config argument {key!r} needs a value: {key}=<{kind.__name__}>")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r}: expected {kind.__name__}") from None
  return out


def method_config(method, num_clusters, rank=8):
  """Adapter kind, trainable-parameter regexes and the optimizer's cluster-stacked leaves."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")
  c = mlc.ConfigDict()
  c.name = method
  c.adapter = "none" if method == "full" else method
  c.num_clusters = num_clusters
  c.rank = rank
  c.moe_mode = "soft"  # moe: 'soft' (dense softmax over experts) or 'top1'.
  c.moe_aux_weight = 0.01
  c.selora_threshold = 1.1  # SeLoRA: grow a layer's rank when its Fisher ratio exceeds this.
  c.selora_every = 50
  c.trainable = {
      "grasp": (r".*/adapter/.*",),
      "moe": (r".*/adapter/.*",),
      "lora": (r".*/lora_.*",),
      "selora": (r".*/lora_.*",),
      "full": (r".*",),
  }[method]
  return c


def with_regularisers(c, cbdm=False, coral=False):
  """CBDM / CORAL on top of any method (paper defaults: tau 1; weight 0.5, temperature 0.1)."""
  if cbdm:
    c.diffusion.cbdm_weight = 1.0
  if coral:
    c.diffusion.coral_weight = 0.5
    c.method.trainable = tuple(c.method.trainable) + (r"coral_head/.*",)
  return c


def base_config():
  """Fields every experiment has; experiment files override what differs."""
  c = mlc.ConfigDict()
  c.seed = 0

  c.data = mlc.ConfigDict()
  c.data.name = "fashion_mnist_lt"
  c.data.config = ""  # TFDS builder config name ('' = default).
  c.data.data_dir = ""  # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data.manual_dir = ""  # Where the user's raw copy lives (real datasets only).
  # Builder config fields, e.g. 'skip_bad_images=true,drop_overlapping_images=true,resolution=512'.
  c.data.builder_options = ""
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.channels = 1
  c.data.batch_size = 32  # Global batch, split over the ('data', 'fsdp') mesh axes.
  c.data.balance = ""  # '', 'class' or 'cluster': re-weighted sampling.
  # Train on this `python -m grasp_jax.task.precompute` cache (VAE posteriors + text); '' = no.
  c.data.cache = ""

  c.partition = mlc.ConfigDict()
  c.partition.strategy = "healthy+frequency"
  c.partition.k = 4
  c.partition.healthy = "No Finding"
  c.partition.thresholds = ""  # e.g. '100,20' (many > 100, few < 20); '' -> quantiles.
  c.partition.groups = ""  # JSON file with a label -> group mapping for strategy 'groups'.
  c.partition.seed = 0  # The random strategies' permutation.

  c.model = mlc.ConfigDict()
  c.model.backbone = "unet"
  c.model.pretrained = ""  # A diffusers model folder; '' -> the demo's own pretrained base.
  c.model.dtype = "float32"  # Compute dtype ('bfloat16' on accelerators); params stay fp32.
  c.model.remat = False
  # Storage dtype of the frozen params on device (backbone base, VAE, text encoders): 'float32',
  # 'bfloat16' or 'float16' halves them; trainables and optimizer state stay float32.
  c.model.frozen_dtype = "float32"
  # A diffusers AutoencoderKL folder for latent diffusion; '' -> <pretrained>/vae when that
  # exists, else pixel space.
  c.model.vae = ""
  # Without `pretrained`, a small base is first trained from scratch with this architecture
  # (overrides of models/<backbone>.tiny_config) and cached in WORKDIR/base as a diffusers folder.
  c.model.base = mlc.ConfigDict()
  # Data fields that differ for pretraining that base (e.g. the demo's source domain).
  c.model.base_data = mlc.ConfigDict()
  c.model.base_steps = 0
  c.model.base_learning_rate = 3e-4
  # Restore the base that ships with the package for this pretraining config, when one does
  # (grasp_jax/run/pretrain.py); False trains it here.
  c.model.base_shipped = True

  c.text = mlc.ConfigDict()
  # 'minilm' (bundled), 'pipeline' (the text encoders of model.pretrained), or a diffusers
  # pipeline / transformers CLIP text-encoder folder. See grasp_jax/inference/conditioning.py.
  c.text.encoder = "minilm"
  c.text.max_length = 77
  c.text.cache = True  # Encode each distinct prompt once and keep it (False: every batch).
  c.text.cache_dtype = "float16"  # Cache precision for pipeline encoders (MiniLM keeps float32).
  # SD3's T5 tokens: 'encoder' (text_encoder_3), 'zeros' (diffusers' text_encoder_3=None), or
  # '' = 'encoder' when the pipeline folder has a text_encoder_3, else 'zeros'.
  c.text.t5 = ""
  c.text.t5_length = 256  # SD3: T5 tokens per prompt (diffusers' max_sequence_length).

  c.method = method_config("grasp", num_clusters=4)

  c.diffusion = mlc.ConfigDict()
  c.diffusion.objective = "eps"  # 'eps', 'v' (UNet) or 'flow' (MMDiT).
  c.diffusion.schedule = "linear"  # DDPM betas 1e-4..0.02 (a pretrained folder brings its own).
  c.diffusion.num_train_timesteps = 1000
  c.diffusion.cfg_dropout = 0.1
  c.diffusion.min_snr_gamma = 0.0  # 0 = off.
  # Samplers clip predicted x0 to [-1, 1] (diffusers' clip_sample): for pixel-space models; a
  # pretrained pipeline's scheduler config overrides it.
  c.diffusion.clip_sample = False
  c.diffusion.flow_shift = 3.0
  c.diffusion.cbdm_weight = 0.0  # tau of CBDM; 0 = off.
  c.diffusion.cbdm_prior = "uniform"  # y' ~ 'uniform' (fine-tuning) or train 'frequency'.
  c.diffusion.coral_weight = 0.0  # CORAL SupCon weight (paper: 0.5); 0 = off.
  c.diffusion.coral_temperature = 0.1

  c.optim = mlc.ConfigDict()
  c.optim.name = "adamw"
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0

  c.train = mlc.ConfigDict()
  c.train.steps = 1000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.ema_decay = 0.0  # 0 = no EMA of trainables.
  # Micro-batches per step: data.batch_size stays the global batch of one optimizer update; its
  # gradient is accumulated over this many micro-batches of batch_size / N (activations per
  # micro-batch). The mean gradient, LR schedule and checkpoint steps do not depend on N.
  c.train.grad_accum_steps = 1
  c.train.nan_policy = "stop"  # 'stop' or 'skip' a step whose loss/grads are not finite.
  c.train.sample_every = 0  # Per-cluster sample grids; 0 = only at the end.
  c.train.diagnostics_every = 0  # Gradient-conflict diagnostics; 0 = off.
  c.train.diagnostics_batches = 4  # Held-out class-balanced eval-split batches they use.
  c.train.profile_steps = 0  # >0: a jax.profiler trace of that many steps (TensorBoard).
  # Resume from this checkpoint step (0 = the newest); the later steps are set aside.
  c.train.resume_from = 0

  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes.
  c.mesh.fsdp = 1
  # Logical axis -> mesh axes. Adapter stacks stay replicated along 'cluster'.
  c.mesh.rules = (("batch", ("data", "fsdp")), ("embed", None), ("mlp", None),
                  ("heads", None), ("conv_in", None), ("conv_out", None), ("norm", None),
                  ("vocab", None), ("cluster", None), ("rank", None))

  c.sample = mlc.ConfigDict()
  c.sample.sampler = "ddim"  # 'ddim', 'dpmpp2m' (UNet) or 'euler' (flow).
  c.sample.steps = 50
  c.sample.guidance_scale = 3.0
  # Self-guided minority sampling (Um & Ye 2024) weight; 0 = off (diffusion/minority.py).
  c.sample.minority_guidance = 0.0
  c.sample.per_class = 200  # Final evaluation: >= 200 per class resolve group differences.
  c.sample.batch_size = 64
  c.sample.classes = ""  # Comma-separated class names; '' -> all.

  c.eval = mlc.ConfigDict()
  c.eval.every = 0  # 0 = only at the end.
  c.eval.every_per_class = 50  # In-training evaluations: samples per class.
  c.eval.every_real_per_class = 50  # In-training evaluations: reference images per class.
  c.eval.real_per_class = 200  # Reference (held-out real) images per class.
  # Held-out pool per class of the eval split (reference + real twin); the rest trains the
  # evaluator. Needs >= real_per_class + sample.per_class for floors at the samples' N.
  c.eval.heldout_per_class = 400
  c.eval.split_seed = 0  # Seeds the eval split's roles (a property of the dataset, not a run).
  # Splits the generator never trains on whose every image also trains the evaluator.
  c.eval.evaluator_extra_splits = ""
  c.eval.evaluator_widths = (16, 32, 64)  # The frozen evaluator CNN's stage widths.
  c.eval.evaluator_hidden = 0  # Its features: 0 = global mean, else a dense layer (networks.CNN).
  c.eval.evaluator_steps = 1000
  c.eval.evaluator_batch_size = 128
  c.eval.evaluator_learning_rate = 3e-3
  c.eval.evaluator_floor = 0.90  # Results of an evaluator less accurate than this are flagged.
  # Half of the evaluator's training images get one low-level change (grey levels: a brightness
  # shift up to +-50, noise of sd up to 30, or 2x2 / 4x4 block means): trained on clean images
  # only, it called samples 15 grey levels too bright "Sandal" whatever their shape (README).
  c.eval.evaluator_brightness = 50.0
  c.eval.evaluator_noise = 30.0
  c.eval.evaluator_blocks = (2, 4)
  c.eval.n_boot = 200  # Bootstrap replicates of every interval.
  c.eval.inception = True  # Also the FID-Inception space (slow on CPU).
  c.eval.inception_n_boot = 50  # Fewer replicates in 2048-d.
  c.eval.fid_mode = "ours"  # Inception preprocessing: 'ours' or clean-fid's 'clean'.
  c.eval.classifier_steps = 300  # Downstream classifiers: at most this many steps.
  c.eval.classifier_batch_size = 64
  c.eval.downstream_val_per_class = 50  # Early-stopping images per class (evaluator role).
  c.eval.downstream_test_per_class = 0  # Test images per class (evaluator role); 0 = the rest.
  c.eval.downstream_validate_every = 50  # Steps between validations.
  c.eval.downstream_patience = 3  # Validations without improvement before stopping.
  c.eval.train_per_class = 0  # Real train images per class for the downstream classifier; 0 = all.
  c.eval.downstream = True
  # Where the evaluator and the generator-free downstream classifiers are cached ('' = WORKDIR).
  c.eval.cache_dir = ""
  return c
