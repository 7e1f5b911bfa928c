"""Pipeline text conditioning vs diffusers' own `encode_prompt`, and the latent codec vs
diffusers' AutoencoderKL, on tiny random SD / SDXL / SD3 (without and with T5) pipelines saved
with `save_pretrained`.

`save_tiny_pipeline(folder, kind)` is also what tests/test_pipeline_e2e.py trains from.
"""
import json
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from grasp_jax.inference import conditioning
from grasp_jax.inference import latents
from grasp_jax.parallel import sharding

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()

# Prompts: repeats, the empty prompt, one truncated at 77 tokens, one with odd characters.
PROMPTS = ["the cat", "a photo of the cat", "", "the cat", "x-ray: café!!",
           " ".join(["photo of the cat"] * 40)]
IMAGE_SIZE = 32  # pixels; the VAEs below downsample by 8


def _tiny_vocab():
  """A CLIP-format BPE vocabulary: byte alphabet (+ end-of-word forms), a few merges."""
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  chars = list(bytes_to_unicode().values())
  merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("o", "t"),
            ("ph", "ot"), ("phot", "o</w>"), ("o", "f</w>")]
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


def _tokenizer(tmp, pad):
  vocab, merges = _tiny_vocab()
  os.makedirs(tmp, exist_ok=True)
  with open(os.path.join(tmp, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(tmp, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  return transformers.CLIPTokenizer(os.path.join(tmp, "vocab.json"),
                                    os.path.join(tmp, "merges.txt"), model_max_length=77,
                                    pad_token=pad)


def _perturb_norms(model):
  """Non-trivial norm affine parameters, so a scale/bias mix-up cannot pass."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower():
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _clip(hidden, projection=None, legacy_eos=False, act="gelu"):
  """A tiny CLIP text model (with projection when `projection` is set)."""
  n = len(_tiny_vocab()[0])
  config = transformers.CLIPTextConfig(
      vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
      eos_token_id=2 if legacy_eos else n - 1, bos_token_id=n - 2, pad_token_id=1,
      projection_dim=projection or 512)
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  return _perturb_norms(cls(config))


# SD3's tokenizer_3 in miniature: a unigram model over metaspace pieces (word pieces, letters,
# a few symbols; digits are unknown), '<pad>' 0, '</s>' 1, '<unk>' 2, '$A </s>' post-processing.
T5_PIECES = (["▁the", "▁cat", "▁a", "▁photo", "▁of", "▁x", "ray", "▁caf", "é", "-", ":", "!", "▁"]
             + list("abcdefghijklmnopqrstuvwxyz"))
T5_PROMPTS = ["a cat <extra_id_1> 42"]  # a sentinel token and unknown characters


def _t5_tokenizer():
  """transformers' T5TokenizerFast on a tokenizers unigram model (no sentencepiece, no hub)."""
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
      (p, -1.0 - 0.1 * i) for i, p in enumerate(T5_PIECES)]
  tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2))
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFKC(), normalizers.Replace(tokenizers.Regex(" {2,}"), " ")])
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
  tok.decoder = decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  return transformers.T5TokenizerFast(tokenizer_object=tok, extra_ids=2, model_max_length=512)


def _t5(width, vocab_size):
  """A tiny t5-v1_1-style encoder (gated gelu); few buckets so 256 tokens reach the far ones."""
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      feed_forward_proj="gated-gelu")
  return _perturb_norms(transformers.T5EncoderModel(config))


def _vae(latent_channels, **kwargs):
  """Downsamples by 8 (4 blocks); the log-variance is shifted so the posterior std is ~e^-1."""
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8),
      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
      layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
      sample_size=IMAGE_SIZE, **kwargs)
  with torch.no_grad():
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    last.bias[latent_channels:] -= 2.0
  return _perturb_norms(vae)


def save_tiny_pipeline(folder, kind="sd", seed=0):
  """A random tiny diffusers pipeline ('sd', 'sdxl', 'sd3' or 'sd3_t5': SD3 with its T5
  text_encoder_3 + tokenizer_3) saved in `folder`; returns it."""
  folder = str(folder)
  torch.manual_seed(seed)
  tmp = folder + "_vocab"
  if kind == "sd":
    unet = diffusers.UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(4, scaling_factor=0.5), text_encoder=_clip(32, legacy_eos=True,
                                                            act="quick_gelu"),
        tokenizer=_tokenizer(tmp, "<|endoftext|>"), unet=_perturb_norms(unet),
        scheduler=diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                          beta_end=0.012, skip_prk_steps=True, steps_offset=1,
                                          set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  elif kind == "sdxl":
    unet = diffusers.UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=32 + 40, norm_num_groups=8,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025), text_encoder=_clip(32, legacy_eos=True,
                                                                act="quick_gelu"),
        text_encoder_2=_clip(40, projection=24), tokenizer=_tokenizer(tmp, "<|endoftext|>"),
        tokenizer_2=_tokenizer(tmp, "!"), unet=_perturb_norms(unet),
        scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear"))
  elif kind in ("sd3", "sd3_t5"):
    t5_tokenizer = _t5_tokenizer() if kind == "sd3_t5" else None
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 8, patch_size=1, in_channels=16, out_channels=16,
        num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
        caption_projection_dim=16, pooled_projection_dim=24 + 20, pos_embed_max_size=8)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False),
        text_encoder=_clip(32, projection=24), tokenizer=_tokenizer(tmp, "<|endoftext|>"),
        text_encoder_2=_clip(40, projection=20), tokenizer_2=_tokenizer(tmp, "!"),
        text_encoder_3=_t5(96, len(t5_tokenizer) + 3) if t5_tokenizer else None,
        tokenizer_3=t5_tokenizer)
  else:
    raise ValueError(kind)
  pipe.save_pretrained(folder)
  return pipe


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipelines")
  return {k: (str(root / k), save_tiny_pipeline(root / k, k))
          for k in ("sd", "sdxl", "sd3", "sd3_t5")}


def _close(ours, ref, atol=1e-5):
  ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  np.testing.assert_allclose(ours, ref, atol=atol * max(1.0, np.abs(ref).max()), rtol=0)


# --- text conditioning --------------------------------------------------------------------------


def test_sd_matches_encode_prompt(pipelines):
  folder, pipe = pipelines["sd"]
  cond = conditioning.pipeline_conditioner(folder, cache_dtype="float32")
  out = cond.lookup(PROMPTS)
  with torch.no_grad():
    ref, ref_null = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    ref_pooled = pipe.text_encoder(pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True,
        return_tensors="pt").input_ids).pooler_output
  assert set(out) == {"context", "pooled"}
  _close(out["context"], ref)
  _close(out["pooled"], ref_pooled)
  null = cond.null_condition()
  _close(null["context"], ref_null[0])  # diffusers' negative prompt "" without a mask
  assert len(cond.cache) == len(set(PROMPTS))


def test_sd_float16_cache_and_uncached(pipelines, tmp_path):
  folder, _ = pipelines["sd"]
  exact = conditioning.pipeline_conditioner(folder, cache=False).lookup(PROMPTS)
  half = conditioning.pipeline_conditioner(folder, cache_path=str(tmp_path / "c.npz"))
  out = half.lookup(PROMPTS)
  assert half.cache.tables["context"].dtype == np.float16
  assert out["context"].dtype == np.float32
  for k in exact:  # float16 rounding only
    np.testing.assert_allclose(out[k], exact[k], rtol=1e-3, atol=1e-3)
  half.save(str(tmp_path / "c.npz"))
  again = conditioning.pipeline_conditioner(folder, cache_path=str(tmp_path / "c.npz"))
  assert len(again.cache) == len(set(PROMPTS))
  np.testing.assert_array_equal(again.lookup(PROMPTS[:2])["context"], out["context"][:2])
  with pytest.raises(ValueError, match="float32"):
    conditioning.pipeline_conditioner(folder, cache_dtype="float32",
                                      cache_path=str(tmp_path / "c.npz"))


def test_sdxl_matches_encode_prompt(pipelines):
  folder, pipe = pipelines["sdxl"]
  cond = conditioning.pipeline_conditioner(folder, image_size=IMAGE_SIZE, cache_dtype="float32")
  out = cond.lookup(PROMPTS)
  with torch.no_grad():
    ref, ref_null, ref_pooled, ref_null_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True)
  assert out["context"].shape == (len(PROMPTS), 77, 72)
  _close(out["context"], ref)
  _close(out["pooled"], ref_pooled)
  time_ids = pipe._get_add_time_ids((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE),
                                    torch.float32, text_encoder_projection_dim=24)
  _close(out["time_ids"], time_ids.expand(len(PROMPTS), -1))
  null = cond.null_condition()  # force_zeros_for_empty_prompt: zeros, time ids kept
  _close(null["context"], ref_null[0])
  _close(null["pooled"], ref_null_pooled[0])
  _close(null["time_ids"], time_ids[0])


def test_sd3_matches_encode_prompt(pipelines):
  folder, pipe = pipelines["sd3"]
  cond = conditioning.pipeline_conditioner(folder, cache_dtype="float32")
  out = cond.lookup(PROMPTS)
  with torch.no_grad():
    ref, ref_null, ref_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                      do_classifier_free_guidance=True)
  assert out["context"].shape == (len(PROMPTS), 77 + 256, 96)
  assert out["pooled"].shape == (len(PROMPTS), 44)
  _close(out["context"], ref)
  _close(out["pooled"], ref_pooled)
  _close(cond.null_condition()["context"], ref_null[0])
  # Only the CLIP part is cached.
  assert cond.cache.tables["context"].shape == (len(set(PROMPTS)), 77, 72)


@pytest.fixture(scope="module")
def sd3_t5(pipelines):
  """The T5 pipeline's folder and diffusers' pipeline read back from it (tokenizer_3 included)."""
  folder, _ = pipelines["sd3_t5"]
  return folder, diffusers.StableDiffusion3Pipeline.from_pretrained(folder)


@pytest.mark.parametrize("t5_length", [256, 12])  # 12 truncates the long prompt
def test_sd3_t5_matches_encode_prompt(sd3_t5, t5_length):
  folder, pipe = sd3_t5
  prompts = PROMPTS + T5_PROMPTS
  cond = conditioning.pipeline_conditioner(folder, t5_length=t5_length, cache_dtype="float32")
  out = cond.lookup(prompts)
  with torch.no_grad():
    ref, ref_null, ref_pooled, _ = pipe.encode_prompt(
        prompts, None, None, device="cpu", do_classifier_free_guidance=True,
        max_sequence_length=t5_length)
  assert out["context"].shape == (len(prompts), 77 + t5_length, 96)
  assert np.abs(ref[:, 77:].numpy()).min(axis=-1).max() > 0  # T5's states, not zeros
  _close(out["context"], ref, atol=1e-4)
  _close(out["pooled"], ref_pooled, atol=1e-4)
  _close(cond.null_condition()["context"], ref_null[0], atol=1e-4)
  # T5's states are cached unpadded next to the CLIP part.
  n = len(set(prompts))
  assert {k: v.shape for k, v in cond.cache.tables.items()} == {
      "context": (n, 77, 72), "pooled": (n, 44), "t5": (n, t5_length, 96)}


def test_sd3_t5_zeros_mode(pipelines, tmp_path):
  """t5='zeros' on a folder with T5: diffusers' text_encoder_3=None path; its cache file is
  refused by the T5 mode."""
  folder, _ = pipelines["sd3_t5"]
  cond = conditioning.pipeline_conditioner(folder, t5="zeros", cache_dtype="float32")
  zeros = cond.lookup(PROMPTS)
  cond.save(str(tmp_path / "c.npz"))
  with pytest.raises(ValueError, match="delete it"):
    conditioning.pipeline_conditioner(folder, cache_dtype="float32",
                                      cache_path=str(tmp_path / "c.npz"))
  pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
                                                            tokenizer_3=None)
  with torch.no_grad():
    ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                               do_classifier_free_guidance=False)
  _close(zeros["context"], ref)
  _close(zeros["pooled"], ref_pooled)
  assert not zeros["context"][:, 77:].any()


def test_frozen_dtype_stores_rounded_params(pipelines):
  """bfloat16 storage: every text encoder's params are bfloat16 on device, and the embeddings
  equal diffusers' with its params rounded to bfloat16 (computed in float32)."""
  folder, _ = pipelines["sd3_t5"]
  encoder = conditioning.PipelineTextEncoder(folder, t5_length=12, frozen_dtype="bfloat16")
  leaves = jax.tree.leaves([e.params for e in encoder.encoders + [encoder.t5]])
  assert leaves and {x.dtype for x in leaves} == {np.dtype("bfloat16")}
  assert encoder.tag == "sd3+t5x12"
  out = encoder.complete(encoder(PROMPTS))
  pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
  with torch.no_grad():
    full, _, _, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                       do_classifier_free_guidance=False, max_sequence_length=12)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
      for p in getattr(pipe, name).parameters():
        p.copy_(p.to(torch.bfloat16).float())
    ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                               do_classifier_free_guidance=False,
                                               max_sequence_length=12)
  _close(out["context"], ref, atol=1e-4)
  _close(out["pooled"], ref_pooled, atol=1e-4)
  assert np.abs(out["context"] - full.numpy()).max() > 1e-3  # the rounding is there


def test_kind_and_errors(pipelines, tmp_path):
  assert [conditioning.pipeline_kind(pipelines[k][0]) for k in ("sd", "sdxl", "sd3")] == [
      "sd", "sdxl", "sd3"]
  with pytest.raises(ValueError, match="not a diffusers pipeline"):
    conditioning.pipeline_kind(str(tmp_path))
  with pytest.raises(ValueError, match="image_size"):
    conditioning.pipeline_conditioner(pipelines["sdxl"][0])
  with pytest.raises(ValueError, match="cache_dtype"):
    conditioning.pipeline_conditioner(pipelines["sd"][0], cache_dtype="int8")
  for kind in ("sd", "sd3"):  # asked for T5 where there is none
    with pytest.raises(ValueError, match="text_encoder_3"):
      conditioning.pipeline_conditioner(pipelines[kind][0], t5="encoder")
  with pytest.raises(ValueError, match="config.text.t5"):
    conditioning.pipeline_conditioner(pipelines["sd3_t5"][0], t5="xxl")
  assert [conditioning.t5_mode(pipelines[k][0]) for k in ("sd3", "sd3_t5")] == ["zeros",
                                                                                  "encoder"]


# --- latent codec -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_codec_matches_autoencoder(pipelines, kind):
  folder, pipe = pipelines[kind]
  vae = pipe.vae
  scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
  images = np.random.default_rng(0).uniform(-1, 1, (8, IMAGE_SIZE, IMAGE_SIZE, 3))
  images = images.astype(np.float32)
  mesh = sharding.make_mesh(mlc.ConfigDict({"data": -1, "fsdp": 1}))  # 8 fake devices
  codec = latents.load_codec(os.path.join(folder, "vae"), mesh=mesh)
  assert codec.latent_shape((IMAGE_SIZE, IMAGE_SIZE, 3)) == (4, 4, vae.config.latent_channels)
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    ref_mean = ((dist.mean - shift) * scale).permute(0, 2, 3, 1).numpy()
    ref_std = (dist.std * scale).permute(0, 2, 3, 1).numpy()
    ref_images = vae.decode(torch.from_numpy(ref_mean).permute(0, 3, 1, 2) / scale + shift
                            ).sample.permute(0, 2, 3, 1)
  mean = codec.encode(images)
  assert mean.sharding.is_equivalent_to(sharding.batch_sharding(mesh), mean.ndim)
  _close(np.asarray(mean), ref_mean, atol=2e-5)
  _close(np.asarray(codec.decode(np.asarray(mean))), ref_images, atol=2e-5)
  # A replicated input (the sampler's output) is resharded over the batch.
  replicated = jax.device_put(mean, sharding.replicated(mesh))
  _close(np.asarray(codec.decode(replicated)), ref_images, atol=2e-5)
  with pytest.raises(TypeError, match="apply_decode"):
    jax.jit(codec.decode)(mean)
  # A posterior sample: (sample - mean) / std is standard normal.
  z = (np.asarray(codec.encode(images, jax.random.key(1))) - ref_mean) / ref_std
  assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1, (z.mean(), z.std())
  # Unsharded input on a codec without a mesh: the same latents.
  plain = latents.LatentCodec(codec.module, codec._host_params)
  _close(np.asarray(plain.encode(images)), ref_mean, atol=2e-5)


def test_codec_errors(pipelines):
  codec = latents.load_codec(os.path.join(pipelines["sd"][0], "vae"))
  with pytest.raises(ValueError, match="channels"):
    codec.latent_shape((32, 32, 1))
  with pytest.raises(ValueError, match="multiple"):
    codec.latent_shape((36, 36, 3))
  with pytest.raises(ValueError, match="AutoencoderKL"):
    latents.load_codec(os.path.join(pipelines["sd"][0], "unet"))
