"""Tiny random Stable Diffusion (1.x/2.x, XL and 3) and PixArt folders built offline, for tests,
benchmarks and the SD notebook.

The components follow diffusers' own ``get_dummy_components()`` sizes; the CLIP tokenizer is a
character-level BPE tokenizer written here and PixArt's T5 tokenizer is ByT5's (bytes, no vocabulary
file), so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the 256 byte values."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _write_char_clip_tokenizer(folder: Path, model_max_length: int, pad_token: str = "<|endoftext|>") -> None:
    chars = _byte_level_alphabet()
    vocab_tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
        "unk_token": "<|endoftext|>"}))


def make_tiny_sd_folder(path: str | Path, seed: int = 0, sample_size: int = 16, model_max_length: int = 77,
                        unet_channels: tuple[int, int] = (4, 8), cross_attention_dim: int = 32,
                        prediction_type: str = "epsilon", pad_token: str = "<|endoftext|>") -> Path:
    """Write a random-weight SD 1.x-layout folder (``save_pretrained`` of each component) to `path`;
    ``prediction_type="v_prediction"`` makes it an SD 2.x-style velocity model, ``pad_token="!"`` pads
    as SD 2.x's tokenizer does (with a token that prompts also contain)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=unet_channels, layers_per_block=1, sample_size=sample_size, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        norm_num_groups=2)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, sample_size=sample_size * 2)
    _write_char_clip_tokenizer(path / "tokenizer", model_max_length, pad_token=pad_token)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=cross_attention_dim,
        intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
        pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), max_position_embeddings=model_max_length))
    # SD v1.4's scheduler settings
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2))
    return path


def make_tiny_sdxl_folder(path: str | Path, seed: int = 0, sample_size: int = 16, model_max_length: int = 77,
                          hidden_sizes: tuple[int, int] = (16, 32), projection_dim: int = 24,
                          force_zeros_for_empty_prompt: bool = True) -> Path:
    """Write a random-weight Stable Diffusion XL folder to `path`, offline.

    Sizes follow diffusers' SDXL ``get_dummy_components()``, smaller: a two-block UNet with
    ``addition_embed_type="text_time"`` (added embedding: 6 time ids x 8 + the pooled projection),
    two CLIP text encoders whose hidden sizes add up to the UNet's cross-attention width (the second
    with a projection, of another width so that the pooled embedding cannot be mistaken for a hidden
    state), both with the character-level tokenizer (the second pads with "!", as SDXL's does), and
    SDXL base's scheduler config (Euler, scaled_linear betas 0.00085..0.012, leading spacing, with the
    DDIM keys SDXL's file carries). The VAE has SDXL's scaling factor and ``force_upcast``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        cross_attention_dim=sum(hidden_sizes), norm_num_groups=2)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, sample_size=sample_size * 2,
                        scaling_factor=0.13025, force_upcast=True)
    _write_char_clip_tokenizer(path / "tokenizer", model_max_length)
    _write_char_clip_tokenizer(path / "tokenizer_2", model_max_length, pad_token="!")
    encoders = []
    for k, (sub, cls) in enumerate((("tokenizer", CLIPTextModel), ("tokenizer_2", CLIPTextModelWithProjection))):
        tokenizer = AutoTokenizer.from_pretrained(path / sub)
        torch.manual_seed(seed + 2 + k)
        encoders.append(cls(CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=hidden_sizes[k],
            intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3,
            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), max_position_embeddings=model_max_length,
            hidden_act="gelu", projection_dim=projection_dim)))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    encoders[0].save_pretrained(path / "text_encoder")
    encoders[1].save_pretrained(path / "text_encoder_2")
    scheduler.save_pretrained(path / "scheduler")
    # SDXL base's scheduler_config.json also carries these DDIM/PNDM keys; DDIM built from it reads them
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update({"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "sample_max_value": 1.0})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
        "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "image_encoder": [None, None],
        "feature_extractor": [None, None]}, indent=2))
    return path


def make_tiny_pixart_folder(path: str | Path, seed: int = 0, sample_size: int = 8, pipeline: str = "PixArtAlphaPipeline",
                            learned_sigma: bool = True) -> Path:
    """Write a random-weight PixArt-alpha (or, with ``pipeline="PixArtSigmaPipeline"``, -Sigma) folder, offline.

    Sizes follow diffusers' PixArt ``get_dummy_components()``: a two-layer ``PixArtTransformer2DModel``
    (patch 2, 3 heads of 8) whose output has the learned-variance half (8 channels for 4 latent
    ones); a two-layer T5 encoder of width 32 with the ByT5 tokenizer (384 ids: every byte); the VAE
    of the tiny SD folders; and PixArt's DPM-Solver++ scheduler config (linear betas 0.0001..0.02).
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8 if learned_sigma else 4,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, sample_size=sample_size * 2)
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = T5EncoderModel(T5Config(
        d_model=32, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": pipeline, "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "ByT5Tokenizer"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}, indent=2))
    return path


def make_tiny_sd3_folder(path: str | Path, seed: int = 0, sample_size: int = 8, with_t5: bool = True,
                         shift: float = 3.0, model_max_length: int = 77) -> Path:
    """Write a random-weight Stable Diffusion 3 folder (``StableDiffusion3Pipeline`` layout) to `path`, offline.

    Sizes follow diffusers' SD3 ``get_dummy_components()``, smaller: a one-layer ``SD3Transformer2DModel``
    (patch 2, 2 heads of 8) reading joint tokens of width 32 (the T5 width; the two CLIP widths, 8 + 16,
    are zero-padded to it as the pipeline does) and a pooled projection of 6 + 10 (the two CLIP
    projections); CLIP-L and CLIP-G as ``CLIPTextModelWithProjection`` with the character-level
    tokenizer (the second pads with "!", as SD3's does); T5 as in the tiny PixArt folder (ByT5
    tokenizer), left out with ``with_t5=False`` (model_index names no text_encoder_3, as for SD3
    loaded without T5); a VAE with SD3's scaling and shift factors; SD3's scheduler config
    (``FlowMatchEulerDiscreteScheduler``, static shift 3.0).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, ByT5Tokenizer, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    path = Path(path)
    clip_widths, projections, t5_width = (8, 16), (6, 10), 32
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=t5_width, caption_projection_dim=16,
        pooled_projection_dim=sum(projections), pos_embed_max_size=sample_size)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, sample_size=sample_size * 2,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    _write_char_clip_tokenizer(path / "tokenizer", model_max_length)
    _write_char_clip_tokenizer(path / "tokenizer_2", model_max_length, pad_token="!")
    for k, sub in enumerate(("tokenizer", "tokenizer_2")):
        tokenizer = AutoTokenizer.from_pretrained(path / sub)
        torch.manual_seed(seed + 2 + k)
        CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=clip_widths[k],
            intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
            pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), max_position_embeddings=model_max_length,
            hidden_act="gelu", projection_dim=projections[k])).save_pretrained(path / ("text_encoder" + sub[9:]))
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.29.0",
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    if with_t5:
        tokenizer = ByT5Tokenizer()
        torch.manual_seed(seed + 4)
        T5EncoderModel(T5Config(
            d_model=t5_width, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=32, vocab_size=len(tokenizer), feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0)).save_pretrained(path / "text_encoder_3")
        tokenizer.save_pretrained(path / "tokenizer_3")
        index.update(text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "ByT5Tokenizer"])
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def make_tiny_flux_folder(path: str | Path, seed: int = 0, sample_size: int = 16, dev: bool = True) -> Path:
    """Write a random-weight FLUX.1 folder (``FluxPipeline`` layout) to `path`, offline.

    Sizes follow diffusers' FLUX ``get_dummy_components()``: a ``FluxTransformer2DModel`` with one double-
    and one single-stream block (2 heads of 16, rotary axes 4, 4, 8) reading T5 tokens of width 32 and a
    pooled CLIP vector of 32, with a guidance embedding when `dev` (schnell has none); CLIP as
    ``CLIPTextModel`` with the character-level tokenizer; T5 as in the tiny SD3 folder (ByT5 tokenizer);
    a VAE of 4 latent channels (16 packed) with FLUX's scaling and shift factors; FLUX's scheduler
    config (dynamic shifting). Images are `sample_size` pixels square.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=dev)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2, sample_size=sample_size,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    _write_char_clip_tokenizer(path / "tokenizer", 77)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    torch.manual_seed(seed + 2)
    CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, hidden_size=32,
        intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2,
        pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), max_position_embeddings=77,
        hidden_act="gelu")).save_pretrained(path / "text_encoder")
    t5_tokenizer = ByT5Tokenizer()
    torch.manual_seed(seed + 3)
    T5EncoderModel(T5Config(
        d_model=32, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, vocab_size=len(t5_tokenizer), feed_forward_proj="gated-gelu",
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=0)).save_pretrained(path / "text_encoder_2")
    t5_tokenizer.save_pretrained(path / "tokenizer_2")
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_pretrained(path / "scheduler")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "ByT5Tokenizer"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def make_tiny_clip_folder(path: str | Path) -> Path:
    """A tiny random transformers CLIP (text and vision towers) with the character-level tokenizer,
    for CLIP-score code paths in tests."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    path = Path(path)
    _write_char_clip_tokenizer(path, 32)
    tok = AutoTokenizer.from_pretrained(path)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(config).save_pretrained(path)
    return path


class MeanColourDescriptor(torch.nn.Module):
    """An SSCD stand-in for tests: an image's descriptor is its mean colour, (B, 3, H, W) -> (B, 3)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def run_cli(*args, kill: str | None = None, timeout: float | None = None):
    """``python -m diffmem.cli.main ARGS`` in a subprocess on one thread (``subprocess.CompletedProcess``,
    text output); `kill` sets ``DIFFMEM_KILL_AT`` (``diffmem.faults``) to kill it at a fault point."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFMEM_KILL_AT", None)
    if kill:
        env["DIFFMEM_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "diffmem.cli.main", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def make_tiny_lora_file(denoiser, path: str | Path, rank: int = 2, seed: int = 0, layout: str = "diffusers",
                        prefix: str = "unet", targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                        alpha: float | None = None) -> Path:
    """Write a random LoRA for `denoiser`'s attention projections `targets` (A: (rank, in), B: (out, rank),
    both non-zero) as a safetensors file: ``layout="diffusers"`` (``unet.<module>.lora_A.weight``, as
    ``save_lora_weights`` writes) or ``"kohya"`` (``lora_unet_<module with _>.lora_down.weight`` and
    ``.alpha``, `alpha` defaulting to the rank). Returns the path."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in denoiser.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(name.endswith("." + t) for t in targets):
            continue
        a = torch.randn(rank, module.in_features, generator=gen) * 0.3
        b = torch.randn(module.out_features, rank, generator=gen) * 0.3
        if layout == "diffusers":
            tensors[f"{prefix}.{name}.lora_A.weight"], tensors[f"{prefix}.{name}.lora_B.weight"] = a, b
        elif layout == "kohya":
            key = f"lora_{prefix}_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = a, b
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        else:
            raise ValueError(f"LoRA layout {layout!r}: expected diffusers or kohya")
    path = Path(path)
    save_file(tensors, str(path))
    return path
