"""Shared config pieces: the config-string parser and the defaults every experiment starts from.

A config file's `get_config(arg)` calls `parse_arg(arg, key=default, ...)`, so
`--config=configs/mimic.py:backbone=dit,method=grasp` selects variants, and
`--config.train.steps=100` overrides single fields (unknown fields are rejected by the flag parser).
"""
import ml_collections as mlc

BACKBONES = ("unet", "dit")
METHODS = ("grasp", "full", "lora", "selora", "moe")


def parse_arg(arg, **defaults):
  """'a=1,b=x,smoke' -> ConfigDict with typed values; a bare word sets a bool default to True."""
  out = mlc.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not _:
      value = True
    elif isinstance(defaults[key], bool):
      value = value.lower() in ("1", "true", "yes")
    else:
      value = type(defaults[key])(value)
    out[key] = value
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
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.image_size = 32
  c.data.channels = 1
  c.data.batch_size = 32  # Global batch, split over the ('data', 'fsdp') mesh axes.
  c.data.balance = ""  # '', 'class' or 'cluster': re-weighted sampling.

  c.partition = mlc.ConfigDict()
  c.partition.strategy = "healthy+frequency"
  c.partition.k = 4
  c.partition.healthy = "No Finding"
  c.partition.thresholds = ""  # e.g. '100,20' (many > 100, few < 20); '' -> quantiles.
  c.partition.groups = ""  # JSON file with a label -> group mapping for strategy 'groups'.

  c.model = mlc.ConfigDict()
  c.model.backbone = "unet"
  c.model.pretrained = ""  # A diffusers model folder; '' -> the demo's own pretrained base.
  c.model.dtype = "float32"  # Compute dtype ('bfloat16' on accelerators); params stay fp32.
  c.model.remat = False
  # A diffusers AutoencoderKL folder for latent diffusion; '' -> <pretrained>/vae when that
  # exists, else pixel space.
  c.model.vae = ""
  # Without `pretrained`, a small base is first trained from scratch with this architecture
  # (overrides of models/<backbone>.tiny_config) and cached in WORKDIR/base as a diffusers folder.
  c.model.base = mlc.ConfigDict()
  c.model.base_steps = 0
  c.model.base_learning_rate = 3e-4

  c.text = mlc.ConfigDict()
  # 'minilm' (bundled), 'pipeline' (the CLIP text encoders of model.pretrained), or a diffusers
  # pipeline / transformers CLIP text-encoder folder. See grasp_jax/conditioning.py.
  c.text.encoder = "minilm"
  c.text.max_length = 77
  c.text.cache = True  # Encode each distinct prompt once and keep it (False: every batch).
  c.text.cache_dtype = "float16"  # Cache precision for pipeline encoders (MiniLM keeps float32).
  c.text.t5_length = 256  # SD3: zero T5 tokens (diffusers' max_sequence_length).

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
  c.train.nan_policy = "stop"  # 'stop' or 'skip' a step whose loss/grads are not finite.
  c.train.sample_every = 0  # Per-cluster sample grids; 0 = only at the end.
  c.train.diagnostics_every = 0  # Gradient-conflict diagnostics; 0 = off.
  c.train.diagnostics_batches = 4  # Held-out class-balanced eval-split batches they use.
  c.train.profile_steps = 0  # >0: a jax.profiler trace of that many steps (TensorBoard).

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
  c.sample.per_class = 64
  c.sample.batch_size = 64
  c.sample.classes = ""  # Comma-separated class names; '' -> all.

  c.eval = mlc.ConfigDict()
  c.eval.every = 0  # 0 = only at the end.
  c.eval.real_per_class = 64
  c.eval.inception = True
  c.eval.classifier_steps = 300
  c.eval.classifier_batch_size = 64
  c.eval.domain_per_class = 1000  # Domain classifier: train images per class (balanced).
  c.eval.train_per_class = 0  # Real train images per class for the downstream classifier; 0 = all.
  c.eval.downstream = True
  # Where the domain classifier and the real-only downstream baseline are cached ('' = WORKDIR).
  c.eval.cache_dir = ""
  return c
