"""Text-to-image pipeline parts for Diffusion-DPO: checking and loading them (diffusers, imported only here
and only when called), encoding prompts and images, LoRA on the UNet, and saving the UNet where diffusers
loads it.

Two layouts, local folders or hub names:
- Stable Diffusion 1.x / 2.x: unet/, vae/, text_encoder/ (CLIPTextModel), tokenizer/, scheduler/. The
  UNet is conditioned on the text encoder's last hidden states.
- SDXL: the same plus text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/. The UNet is conditioned
  on both encoders' penultimate hidden states, concatenated, plus `added_cond_kwargs`: the second encoder's
  pooled projection (`text_embeds`) and the size/crop micro-conditioning `time_ids` (original height, width,
  crop top, left, target height, width), as diffusers' SDXL pipeline and training scripts compute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.load import ConfigError
from alignkit.io import follow_umask
from alignkit.models.load import DTYPES, check_model_source, check_tokenizer_source, freeze

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = (*SD_PARTS, "text_encoder_2", "tokenizer_2")


def check_pipeline_source(cfg) -> None:
    """A local pipeline folder has every part of its layout, each loadable (configs, safetensors weights,
    tokenizer files); checked before anything is read. Hub names pass (diffusers reports those)."""
    if not cfg.model:
        raise ValueError("model is not set: give model=<hub name or local pipeline folder>")
    path = Path(cfg.model).expanduser()
    if not path.is_dir():
        check_model_source(cfg.model, "model")  # a local path that is missing or a file: says which
        return
    sdxl = (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir()
    parts = SDXL_PARTS if sdxl else SD_PARTS
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise ValueError(
            f"model: {cfg.model} lacks {', '.join(f'{p}/' for p in missing)} (expected a Stable Diffusion "
            f"pipeline folder: {', '.join(f'{p}/' for p in SD_PARTS)}, and for SDXL text_encoder_2/, tokenizer_2/)"
        )
    for part in parts:
        if part.startswith("tokenizer"):
            check_tokenizer_source(str(path / part), f"model ({part}/)")
        elif part == "scheduler":
            if not (path / part / "scheduler_config.json").is_file():
                raise ValueError(f"model: {cfg.model}/scheduler has no scheduler_config.json")
        else:
            check_model_source(str(path / part), f"model ({part}/)")


def is_sdxl(name_or_path: str) -> bool:
    """Whether the pipeline has SDXL's second text encoder (a local folder's subfolders, else the hub
    repository's model_index.json)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return (path / "text_encoder_2").is_dir()
    from diffusers import DiffusionPipeline

    return "text_encoder_2" in DiffusionPipeline.load_config(name_or_path)


@dataclass
class Pipeline:
    """The loaded parts: the UNet (trained), the frozen VAE and text encoder(s), their tokenizer(s), and the
    training-time noise scheduler."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    scheduler: object

    @property
    def sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def load_pipeline(name_or_path: str, dtype: str, device, gradient_checkpointing: bool = False) -> Pipeline:
    """The parts of the pipeline `name_or_path` (safetensors only), on `device`, the VAE and text encoders
    frozen. The scheduler is a DDPMScheduler with the pipeline's noise schedule and prediction type (the
    training-time forward process, whatever sampler the pipeline ships); epsilon and v_prediction only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    sdxl = is_sdxl(name_or_path)
    kwargs = {"use_safetensors": True, "torch_dtype": None if dtype == "auto" else DTYPES[dtype]}
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kwargs).to(device)
    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **kwargs).to(device)
    encoders = [CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kwargs)]
    tokenizers = [AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")]
    if sdxl:
        second = CLIPTextModelWithProjection.from_pretrained(
            name_or_path, subfolder="text_encoder_2", **kwargs
        )
        encoders.append(second)
        tokenizers.append(AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2"))
    if sdxl != (unet.config.addition_embed_type == "text_time"):
        raise ValueError(
            f"model: {name_or_path} has {len(encoders)} text encoder(s) but its UNet's addition_embed_type is "
            f"{unet.config.addition_embed_type!r}; expected an SD 1.x/2.x or an SDXL pipeline"
        )
    scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"model: the scheduler predicts '{scheduler.config.prediction_type}'; diffusion-dpo trains "
            "epsilon or v_prediction models"
        )
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    encoders = [freeze(e).to(device) for e in encoders]
    return Pipeline(unet, freeze(vae), encoders, tokenizers, scheduler)


def check_resolution(resolution: int, vae, unet) -> None:
    """The latents of a resolution x resolution image must halve cleanly through every UNet down block."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % (vae_factor * unet_factor):
        raise ConfigError(
            f"resolution={resolution} must be a multiple of {vae_factor * unet_factor} for this pipeline "
            f"(VAE downsamples by {vae_factor}, the UNet by {unet_factor}); e.g. 512 for SD 1.5"
        )


def encode_prompts(
    pipeline: Pipeline, input_ids: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context (B, L, D), pooled (B, P) or None) for each encoder's (B, L) token ids, as the pipelines
    condition their UNet: SD, the encoder's last hidden states; SDXL, both encoders' penultimate hidden states
    concatenated (D = D1 + D2) and the second encoder's pooled projection. No attention mask, as there."""
    if not pipeline.sdxl:
        return pipeline.text_encoders[0](input_ids[0])[0], None
    hidden, pooled = [], None
    for encoder, ids in zip(pipeline.text_encoders, input_ids):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) pixels in [-1, 1] -> (N, 4, R/f, R/f) latents: the VAE posterior's mean, scaled."""
    pixels = pixels.to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor


def add_unet_lora(unet, lora) -> torch.nn.Module:
    """Freeze the UNet and add a trainable LoRA adapter through peft (diffusers' `add_adapter`) from
    LoraSettings; the adapter starts as a no-op (B = 0), so at step 0 the policy is the reference. Its
    weights are float32 whatever the UNet's dtype."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    targets = [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


def save_unet(unet, final: Path, *, lora: bool, sdxl: bool = False) -> Path:
    """The trained UNet where diffusers loads it: the LoRA as final/pytorch_lora_weights.safetensors
    (`pipe.load_lora_weights(final)`, SD or SDXL pipeline), or the whole UNet as final/unet
    (`UNet2DConditionModel.from_pretrained(final, subfolder="unet")`)."""
    final.mkdir(parents=True, exist_ok=True)
    if lora:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        saver = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
        saver.save_lora_weights(final, unet_lora_layers=layers, safe_serialization=True)
    else:
        unet.save_pretrained(final / "unet", safe_serialization=True)
    follow_umask(final)
    return final
