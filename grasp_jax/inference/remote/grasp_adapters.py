"""diffusers remote code: a UNet / SD3 transformer carrying GRASP's K cluster adapters (or the MoE
baseline's K experts and router) at its feed-forward layers. Copied into the backbone folder of a
pipeline export (grasp_jax/inference/pipeline_export.py); not imported by grasp_jax.

Each FeedForward named in config.json's `_grasp_jax.adapter_sites` computes `ffn(x) + delta(x)`:
  grasp  delta = up_k act(down_k x + down_bias_k) + up_bias_k with k the sample's cluster, set by
         `set_cluster_ids(ids)` (one id per image; the classifier-free-guidance batch repeats
         them); zero while unset and for ids outside 0..K-1, which is the frozen base;
  moe    delta = sum_k w_k (up_k act(down_k x + down_bias_k) + up_bias_k), w = softmax(x router)
         per token ('top<n>': the n largest, renormalised when n > 1); off while unset.
The weights are the Flax ones, in their layout: down [K, C, r], up [K, r, C], router [C, K].
"""
import torch
from torch import nn
from torch.nn import functional as F
from diffusers import SD3Transformer2DModel
from diffusers import UNet2DConditionModel

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu, "silu": F.silu, "identity": lambda x: x}


class AdapterBank(nn.Module):

  def __init__(self, dim, meta):
    super().__init__()
    k, r = meta["num_clusters"], meta["rank"]
    self.method, self.moe_mode = meta["method"], meta["moe_mode"]
    self.act = ACTIVATIONS[meta["activation"]]
    self.down = nn.Parameter(torch.zeros(k, dim, r))
    self.down_bias = nn.Parameter(torch.zeros(k, r))
    self.up = nn.Parameter(torch.zeros(k, r, dim))
    self.up_bias = nn.Parameter(torch.zeros(k, dim))
    if self.method == "moe":
      self.router = nn.Parameter(torch.zeros(dim, k))
    self.cluster_ids = None

  def forward(self, x):
    if self.cluster_ids is None:
      return torch.zeros_like(x)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    if self.method == "moe":
      out = self._experts(tokens, self._router_weights(tokens))
    else:
      ids = self.cluster_ids.to(x.device)
      ids = ids.repeat(x.shape[0] // len(ids))  # [cond; uncond] under guidance.
      valid = ((ids >= 0) & (ids < self.down.shape[0])).to(x.dtype)[:, None, None]
      k = ids.clamp(0, self.down.shape[0] - 1)
      h = self.act(torch.einsum("bnc,bcr->bnr", tokens, self.down[k]) + self.down_bias[k, None])
      out = (torch.einsum("bnr,brc->bnc", h, self.up[k]) + self.up_bias[k, None]) * valid
    return out.reshape(x.shape)

  def _router_weights(self, x):
    probs = torch.softmax(x.float() @ self.router, dim=-1)
    if self.moe_mode == "soft":
      return probs.to(x.dtype)
    top_p, top_i = probs.topk(int(self.moe_mode[3:]), dim=-1)
    if top_p.shape[-1] > 1:
      top_p = top_p / top_p.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_i, top_p).to(x.dtype)

  def _experts(self, x, weights):
    h = self.act(torch.einsum("bnc,kcr->bnkr", x, self.down) + self.down_bias)
    out = torch.einsum("bnkr,krc->bnc", h * weights[..., None], self.up)
    return out + weights @ self.up_bias


class AdaptedFeedForward(nn.Module):
  """A diffusers FeedForward (its `net`, so weight names stay) plus an AdapterBank."""

  def __init__(self, ff, meta):
    super().__init__()
    self.net = ff.net
    self.adapter = AdapterBank(ff.net[0].proj.in_features, meta)

  def forward(self, hidden_states, *args, **kwargs):
    out = hidden_states
    for module in self.net:
      out = module(out)
    return out + self.adapter(hidden_states)


class _WithAdapters:
  """`from_config` (which `from_pretrained` calls before loading weights) adds the adapters."""

  @classmethod
  def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
    out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
    model = out[0] if return_unused_kwargs else out
    meta = dict(config)["_grasp_jax"]
    model.adapter_method = meta["method"]
    for name in meta["adapter_sites"]:
      parent, _, attr = name.rpartition(".")
      setattr(model.get_submodule(parent), attr,
              AdaptedFeedForward(model.get_submodule(name), meta))
    return out

  def set_cluster_ids(self, ids):
    """Cluster id per image (a LongTensor), or None for the frozen base."""
    for module in self.modules():
      if isinstance(module, AdapterBank):
        module.cluster_ids = ids


class AdaptedUNet2DConditionModel(_WithAdapters, UNet2DConditionModel):
  pass


class AdaptedSD3Transformer2DModel(_WithAdapters, SD3Transformer2DModel):
  pass
