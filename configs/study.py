"""One run of the reproduction study: a method fine-tuned on the demo's shared base.

Command (the whole study, every run below, then results/study.json and docs/RESULTS.md):
  python -m grasp_jax.study --workdir=workdir/study
One run by hand: --config=configs/study.py:backbone=unet,run=grasp,seed=0,base=DIR where DIR is
the pretrained base (a diffusers folder; the study trains one per backbone from the demo config).
Runs: RUNS below, equal steps and batch (the demo's), on `fashion_mnist_lt`. `cbdm` and `coral`
are the regularisers on full fine-tuning, as in their papers; `grasp+cbdm` / `grasp+coral` put
them on GRASP. Evaluation as the demo's, with the domain classifier and the real-only downstream
classifier cached once in `cache` for every run.
"""
from configs import common
from configs import demo

# name -> (method, moe_mode, cbdm, coral)
RUNS = {
    "grasp": ("grasp", "soft", False, False),
    "full": ("full", "soft", False, False),
    "lora": ("lora", "soft", False, False),
    "selora": ("selora", "soft", False, False),
    "moe_soft": ("moe", "soft", False, False),
    "moe_top1": ("moe", "top1", False, False),
    "cbdm": ("full", "soft", True, False),
    "coral": ("full", "soft", False, True),
    "grasp+cbdm": ("grasp", "soft", True, False),
    "grasp+coral": ("grasp", "soft", False, True),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, backbone="unet", run="grasp", seed=0, base="", cache="",
                         smoke=False)
  if arg.run not in RUNS:
    raise ValueError(f"unknown study run {arg.run!r}; known: {sorted(RUNS)}")
  method, moe_mode, cbdm, coral = RUNS[arg.run]
  c = demo.get_config(f"backbone={arg.backbone},method={method},seed={arg.seed},"
                      f"cbdm={cbdm},coral={coral},smoke={arg.smoke}")
  c.model.pretrained = arg.base
  if not arg.smoke:  # A stronger base and classifiers than the 10-minute demo's.
    c.model.base_steps = 1500
    c.eval.classifier_steps = 200
  c.method.moe_mode = moe_mode
  c.eval.cache_dir = arg.cache
  return c
