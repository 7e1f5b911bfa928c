"""T5 encoder parity with transformers' T5EncoderModel on tiny random models."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grasp_jax.models import convert
from grasp_jax.models.text import t5
from grasp_jax.models.text import tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = {
    # Few buckets and a short max_distance, so L=20 reaches the log-spaced and the last bucket;
    # inner width num_heads * d_kv (24) differs from d_model.
    "relu": dict(vocab_size=64, d_model=32, d_kv=6, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=12,
                 feed_forward_proj="relu"),
    # t5-v1_1 style: gated gelu_new, default buckets; 3 blocks share block 0's bias.
    "gated-gelu": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=40, num_layers=3, num_heads=4,
                       feed_forward_proj="gated-gelu"),
}
LENGTH = 20


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 64, (3, LENGTH)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 13:] = 0
  mask[2, 5:] = 0
  return ids, mask


def _abstract(module):
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *t5.example_inputs(module))["params"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (folder, torch model, flax module, params) from save_pretrained safetensors."""
  out = {}
  for name, config in CONFIGS.items():
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(transformers.T5Config(**config)).eval()
    with torch.no_grad():  # non-trivial norm scales, so a scale mix-up cannot pass
      for key, p in ref.named_parameters():
        if "layer_norm" in key:
          p.mul_(1 + 0.2 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp(f"t5_{name}"))
    ref.save_pretrained(folder, safe_serialization=True)
    module = t5.from_config(ref.config.to_dict())
    state = convert.read_safetensors(folder, "model")
    params = convert.torch_to_flax(state, _abstract(module), t5.rename)
    out[name] = folder, ref, module, params
  return out


def _reference(ref, ids, mask=None):
  with torch.no_grad():
    return ref(torch.from_numpy(ids).long(),
               attention_mask=None if mask is None else torch.from_numpy(mask)
               ).last_hidden_state.numpy()


def _assert_close(ours, theirs, tol=1e-5):
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol * max(1.0, np.abs(theirs).max()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers(models, name):
  _, ref, module, params = models[name]
  ids, mask = _inputs()
  run = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask).last_hidden_state)
  _assert_close(np.asarray(run(params, ids, None)), _reference(ref, ids))
  masked = np.asarray(run(params, ids, mask))
  _assert_close(masked, _reference(ref, ids, mask))
  # The mask must matter: padded keys change the valid positions when attended to.
  assert np.abs(masked[2, :5] - np.asarray(run(params, ids, None))[2, :5]).max() > 1e-3


def test_relative_position_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for num_buckets, max_distance in ((32, 128), (8, 12), (64, 300)):
    ours = t5.relative_position_buckets(400, 400, num_buckets, max_distance)
    rel = torch.arange(400)[None, :] - torch.arange(400)[:, None]
    theirs = bucket(rel, bidirectional=True, num_buckets=num_buckets,
                    max_distance=max_distance).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(ours)) == num_buckets - 1  # (+, distance 0) is never used


def test_tied_embedding_either_key(models):
  """Checkpoints may store the token embedding as `shared`, `encoder.embed_tokens`, or both."""
  folder, _, module, params = models["relu"]
  state = convert.read_safetensors(folder, "model")
  table = state.pop("shared.weight", None)
  if table is None:
    table = state["encoder.embed_tokens.weight"]
  for extra in ({"encoder.embed_tokens.weight": table},
                {"encoder.embed_tokens.weight": table, "shared.weight": table}):
    loaded = convert.torch_to_flax({**state, **extra}, _abstract(module), t5.rename)
    np.testing.assert_array_equal(loaded["shared"]["embedding"], params["shared"]["embedding"])
    np.testing.assert_array_equal(loaded["shared"]["embedding"], table)


def test_wrong_shape_names_the_key(models):
  folder, _, module, _ = models["gated-gelu"]
  state = convert.read_safetensors(folder, "model")
  key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  state[key] = np.zeros((41, 32), np.float32)
  with pytest.raises(convert.CheckpointMismatchError, match=key.replace(".", r"\.")) as err:
    convert.torch_to_flax(state, _abstract(module), t5.rename)
  assert "encoder/block_1/layer_1/DenseReluDense/wi_1/kernel" in str(err.value)


def test_load_text_encoder(models, monkeypatch):
  """Dispatch through convert's registry on `architectures: [T5EncoderModel]`."""
  monkeypatch.setitem(convert._TRANSFORMERS, "T5EncoderModel", "grasp_jax.models.text.t5")
  folder, ref, _, _ = models["gated-gelu"]
  module, params = convert.load_text_encoder(folder)
  assert module.config.dense_act_fn == "gelu_new" and module.config.is_gated_act
  ids, mask = _inputs()
  out = module.apply({"params": params}, ids, mask).last_hidden_state
  _assert_close(np.asarray(out), _reference(ref, ids, mask))


def test_bfloat16_compute(models):
  _, ref, module, params = models["gated-gelu"]
  ids, mask = _inputs()
  out = module.clone(dtype=jnp.bfloat16).apply({"params": params}, ids, mask).last_hidden_state
  assert out.dtype == jnp.bfloat16
  _assert_close(np.asarray(out, np.float32), _reference(ref, ids, mask), tol=3e-2)


def test_config_and_logical_axes():
  module = t5.from_config({"feed_forward_proj": "gated-silu", "d_model": 16, "num_heads": 2,
                           "d_kv": 8, "d_ff": 24, "num_layers": 1, "vocab_size": 10})
  assert module.config.dense_act_fn == "silu" and module.config.is_gated_act
  leaves = jax.tree.leaves(_abstract(module),
                           is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
  assert leaves and all(isinstance(x, flax.linen.LogicallyPartitioned) for x in leaves)
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5.from_config({"feed_forward_proj": "double-gelu"})
  with pytest.raises(ValueError, match="swishy"):
    t5.from_config({"feed_forward_proj": "swishy"})


def test_sentencepiece_only_tokenizer_folder(tmp_path):
  """A tokenizer_3 without tokenizer.json cannot be read without sentencepiece: say how to fix."""
  (tmp_path / "spiece.model").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="T5TokenizerFast.*save_pretrained"):
    tokenizer.load_tokenizer(str(tmp_path))
