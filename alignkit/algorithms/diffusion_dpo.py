"""Diffusion-DPO (Wallace et al. 2023): align a text-to-image diffusion model with image preference pairs.

    alignkit diffusion-dpo model=stable-diffusion-v1-5/stable-diffusion-v1-5 data=pairs.jsonl max_steps=2000

Reads top to bottom: pipeline parts -> data (every image opened first) -> LoRA on the UNet -> the
reference (the UNet with its adapter off, or a frozen copy) -> optional latent cache -> fit -> save the LoRA
where diffusers loads it (`pipe.load_lora_weights(output_dir/final)`). The maths is
alignkit.losses.diffusion; `denoising_errors` is the batch function the prepared UNet runs;
`DenoisingPairs` turns a batch into the noised inputs (one t and one ε per pair, shared by both images) and
the loss. diffusers is an optional extra (`pip install alignkit[diffusion]`), imported only when a run
loads a pipeline (alignkit.models.diffusion).

The model is a folder in the Stable Diffusion 1.x / 2.x or the SDXL layout (see alignkit.models.diffusion),
local or a hub name. The VAE and the text encoder(s) are frozen; latents are the VAE posterior's
mean times its scaling factor (deterministic, so cached and on-the-fly latents are the same numbers).
Training noise comes from a generator seeded by (seed, process, draw count), the count saved in every
checkpoint, so a resumed run draws exactly the noise of the uninterrupted one; evaluation noise is fixed per
eval batch, so eval metrics at different steps compare the same t and ε.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.load import ConfigError
from alignkit.config.preference import UNET_ATTENTION, DiffusionDPOConfig
from alignkit.data.image_pairs import ImagePair, load_image_pairs, pixel_values, size_time_ids
from alignkit.data.prepare import bad_rows_list, report_dropped, split_eval
from alignkit.losses.diffusion import denoising_mse, diffusion_dpo_loss
from alignkit.models.diffusion import (
    Pipeline,
    add_unet_lora,
    check_pipeline_source,
    check_resolution,
    encode_images,
    encode_prompts,
    load_pipeline,
    save_unet,
)
from alignkit.models.load import BatchForward, freeze
from alignkit.models.reference import Reference
from alignkit.training.loop import fit
from alignkit.training.setup import finish_run, start_run
from alignkit.training.step import evaluate_in_batches

# TrainConfig settings with no meaning for a diffusion pipeline: set to anything but their default, an error.
UNUSED = (
    "tokenizer",
    "max_length",
    "max_prompt_length",
    "attn_implementation",
    "logprob_chunk_size",
    "trust_remote_code",
    "cache_dir",
    "system_prompt",
    "chat_template_kwargs",
)


def check_settings(cfg: DiffusionDPOConfig) -> None:
    """Settings that would be silently ignored are errors, naming the key."""
    defaults = DiffusionDPOConfig()
    for name in UNUSED:
        if getattr(cfg, name) != getattr(defaults, name):
            raise ConfigError(f"{name} is not used by diffusion-dpo (a text-to-image pipeline); remove it")
    if cfg.lora.enabled and cfg.lora.target_modules == "all-linear":
        raise ConfigError(
            f"lora.target_modules=all-linear is for transformers models; name the UNet's modules, e.g. "
            f"{UNET_ATTENTION} (the default)"
        )
    if cfg.lora.merge:
        raise ConfigError(
            "lora.merge is not supported by diffusion-dpo: the LoRA is saved for pipe.load_lora_weights; "
            "merge it there with pipe.fuse_lora()"
        )


def tokenize_pairs(
    pairs: list[ImagePair], pipeline: Pipeline, resolution: int, start: int = 0, *, log=print
) -> list[dict]:
    """Examples {"input_ids" (and "input_ids_2" for SDXL), "attention_mask", "chosen", "rejected", "index"},
    plus SDXL's "chosen_time_ids" / "rejected_time_ids": each prompt padded to its text encoder's length
    (tokenizer.model_max_length, 77 for CLIP) as the pipelines do; prompts cut there are counted."""
    examples, cut = [], 0
    for i, pair in enumerate(pairs):
        example = {"chosen": pair.chosen, "rejected": pair.rejected, "index": start + i}
        for k, tokenizer in enumerate(pipeline.tokenizers):
            length = tokenizer.model_max_length
            encoded = tokenizer(pair.prompt, padding="max_length", max_length=length, truncation=True)
            example["input_ids" if k == 0 else f"input_ids_{k + 1}"] = encoded["input_ids"]
            if k == 0:
                example["attention_mask"] = encoded["attention_mask"]
                cut += len(tokenizer(pair.prompt)["input_ids"]) > length
        if pipeline.sdxl:
            for side in ("chosen", "rejected"):
                example[f"{side}_time_ids"] = size_time_ids(example[side], resolution)
        examples.append(example)
    if cut:
        length = pipeline.tokenizers[0].model_max_length
        log(
            f"{cut} of {len(pairs)} prompts are longer than the text encoder's {length} tokens; their ends are cut"
        )
    return examples


def make_collate(resolution: int):
    """Batch: the examples' token ids, attention_mask (B, L), index (B,) and SDXL time ids (B, 6) as tensors,
    and per image either its cached latents (B, 4, h, w) or its pixels (B, 3, R, R) in [-1, 1]."""

    def collate(examples: list[dict]) -> dict:
        columns = [k for k in examples[0] if k not in ("chosen", "rejected") and not k.endswith("_latents")]
        batch = {k: torch.tensor([e[k] for e in examples]) for k in columns}
        for side in ("chosen", "rejected"):
            if f"{side}_latents" in examples[0]:
                batch[f"{side}_latents"] = torch.stack([e[f"{side}_latents"] for e in examples])
            else:
                batch[f"{side}_pixels"] = torch.stack([pixel_values(e[side], resolution) for e in examples])
        return batch

    return collate


def cache_latents(examples: list[dict], vae, resolution: int, batch_size: int, *, autocast) -> None:
    """Encode every example's two images once, in batches, and keep the latents on the examples (CPU)."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        for side in ("chosen", "rejected"):
            with autocast():
                latents = encode_images(vae, torch.stack([pixel_values(e[side], resolution) for e in chunk]))
            for e, z in zip(chunk, latents.float().cpu()):
                e[f"{side}_latents"] = z


def denoising_errors(unet, inputs: dict) -> dict[str, torch.Tensor]:
    """The batch function the prepared UNet runs: one forward over the 2B noised latents (preferred images
    first) -> {"chosen", "rejected": (B,) per-sample denoising MSE against the target}."""
    added = inputs.get("added")  # SDXL: {"text_embeds": (2B, P), "time_ids": (2B, 6)}
    prediction = unet(
        inputs["noisy"], inputs["timesteps"], encoder_hidden_states=inputs["context"], added_cond_kwargs=added
    ).sample
    chosen, rejected = denoising_mse(prediction, inputs["target"]).chunk(2)
    return {"chosen": chosen, "rejected": rejected}


def seeded(*numbers: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints (the same in every process and run: ints hash to
    themselves, unlike strings, whose hash Python salts per process)."""
    return torch.Generator().manual_seed(hash(numbers) % 2**63)


@dataclass
class NoiseDraws:
    """The training noise's generator: seeded by (seed, process, draws so far), its count saved in every
    checkpoint (`fit`'s `state`), so a resumed run draws what the uninterrupted one did."""

    seed: int
    rank: int = 0
    draws: int = 0

    def next(self) -> torch.Generator:
        self.draws += 1
        return seeded(self.seed, self.rank, self.draws)

    def state_dict(self) -> dict:
        return {"draws": torch.tensor(self.draws)}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])


@dataclass
class DenoisingPairs:
    """`loss_fn(model, batch)` for `fit`: noise each pair's two latents at one shared t and ε, run the
    prepared UNet (policy) and the reference on them, and return the Diffusion-DPO loss and its metrics."""

    cfg: DiffusionDPOConfig
    pipeline: Pipeline
    reference: Reference
    noise: NoiseDraws

    def inputs(self, batch: dict, generator: torch.Generator) -> dict:
        """{"noisy", "target": (2B, C, h, w), "timesteps": (2B,), "context": (2B, L, D)}, preferred images
        first; for SDXL also "added": {"text_embeds": (2B, P), "time_ids": (2B, 6)}."""
        pipe = self.pipeline
        with torch.no_grad():
            latents = [
                batch[f"{s}_latents"]
                if f"{s}_latents" in batch
                else encode_images(pipe.vae, batch[f"{s}_pixels"])
                for s in ("chosen", "rejected")
            ]
            ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if pipe.sdxl else [])
            context, pooled = encode_prompts(pipe, ids)  # (B, L, D), (B, P) or None
        x0 = torch.cat(latents).float()  # (2B, C, h, w)
        B = x0.shape[0] // 2
        eps = torch.randn(x0[:B].shape, generator=generator).to(x0.device)  # one ε per pair ...
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (B,), generator=generator)
        eps, t = eps.repeat(2, 1, 1, 1), t.to(x0.device).repeat(2)  # ... shared by both of its images
        noisy = pipe.scheduler.add_noise(x0, eps, t)
        if pipe.scheduler.config.prediction_type == "v_prediction":
            target = pipe.scheduler.get_velocity(x0, eps, t)
        else:
            target = eps
        inputs = {
            "noisy": noisy.to(context.dtype),
            "timesteps": t,
            "context": context.repeat(2, 1, 1),
            "target": target,
        }
        if pooled is not None:
            time_ids = torch.cat([batch["chosen_time_ids"], batch["rejected_time_ids"]])
            inputs["added"] = {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids.to(context.dtype)}
        return inputs

    def __call__(self, model, batch: dict):
        if model.training:
            generator = self.noise.next()
        else:  # the same t and ε for an eval batch at every evaluation (a batch is fixed by its first row)
            generator = seeded(self.cfg.seed, -1, int(batch["index"][0]))
        inputs = self.inputs(batch, generator)
        policy = model(inputs)
        ref = self.reference(model, inputs)
        out = diffusion_dpo_loss(
            policy["chosen"],
            policy["rejected"],
            ref["chosen"],
            ref["rejected"],
            beta=self.cfg.beta,
            loss=self.cfg.loss,
        )
        margins = (out.chosen_rewards - out.rejected_rewards).detach()
        metrics = {
            "loss": out.losses.detach().mean(),
            "rewards/accuracies": out.metrics["accuracy"].mean(),
            "rewards/margins": margins.mean(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "mse/policy_chosen": policy["chosen"].detach().mean(),
            "mse/policy_rejected": policy["rejected"].detach().mean(),
            "mse/reference_chosen": ref["chosen"].mean(),
            "mse/reference_rejected": ref["rejected"].mean(),
        }
        return out.losses.mean(), metrics


def read_pairs(cfg: DiffusionDPOConfig, log=print) -> tuple[list[ImagePair], list[ImagePair]]:
    """Train and eval pairs (eval_data, or eval_fraction of data), every image checked; ties and dropped rows
    said."""
    skipped = bad_rows_list(cfg)
    train = load_image_pairs(cfg.data, cfg.data_split, skipped)
    ties = train.ties
    if cfg.eval_data:
        held_out = load_image_pairs(cfg.eval_data, cfg.eval_split, skipped)
        train_rows, eval_rows, ties = train.rows, held_out.rows, ties + held_out.ties
    else:
        train_rows, eval_rows = split_eval(train.rows, cfg.eval_fraction, cfg.seed)
    if ties:
        log(f"{ties} tied pairs (label_0 = 0.5: no preferred image) dropped")
    report_dropped(cfg, skipped or [], log)
    log(f"{len(train_rows)} training pairs, {len(eval_rows)} eval pairs")
    return train_rows, eval_rows


def train(cfg: DiffusionDPOConfig) -> Path:
    """Train a LoRA (or the whole UNet) with Diffusion-DPO; returns the folder of the saved result."""
    check_settings(cfg)
    accelerator, log, output_dir = start_run(cfg, check_sources=check_pipeline_source)

    # Data: every image opened before any weights load, so bad rows fail fast.
    train_pairs, eval_pairs = read_pairs(cfg, log)
    pipe = load_pipeline(cfg.model, cfg.dtype, accelerator.device, cfg.gradient_checkpointing)
    check_resolution(cfg.resolution, pipe.vae, pipe.unet)
    train_examples = tokenize_pairs(train_pairs, pipe, cfg.resolution, 0, log=log)
    eval_examples = tokenize_pairs(eval_pairs, pipe, cfg.resolution, len(train_pairs), log=log)
    if cfg.cache_latents:
        with torch.no_grad():
            examples = train_examples + eval_examples
            cache_latents(
                examples, pipe.vae, cfg.resolution, cfg.vae_batch_size, autocast=accelerator.autocast
            )
        log(f"latents of {2 * (len(train_examples) + len(eval_examples))} images cached")

    # The reference: the UNet with its adapter switched off, or (full fine-tuning) a frozen copy.
    unet = pipe.unet
    frozen = None if cfg.lora.enabled else BatchForward(freeze(copy.deepcopy(unet)), denoising_errors)
    if cfg.lora.enabled:
        unet = add_unet_lora(unet, cfg.lora)
    unet.train()
    mode = "adapter" if cfg.lora.enabled else "copy"
    reference = Reference(
        mode, ("chosen", "rejected"), frozen, accelerator.unwrap_model, autocast=accelerator.autocast
    )
    noise = NoiseDraws(cfg.seed, accelerator.process_index)
    objective = DenoisingPairs(cfg, pipe, reference, noise)
    collate = make_collate(cfg.resolution)

    def evaluate(prepared) -> dict:
        return evaluate_in_batches(
            prepared, eval_examples, cfg.batch_size, collate, loss_fn=objective, device=accelerator.device
        )

    prepared, _ = fit(
        cfg,
        accelerator,
        BatchForward(unet, denoising_errors),
        train_examples,
        collate=collate,
        loss_fn=objective,
        evaluate=evaluate if eval_examples else None,
        state=noise,
    )

    final = output_dir / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_unet(accelerator.unwrap_model(prepared).model, final, lora=cfg.lora.enabled, sdxl=pipe.sdxl)
        log(f"final {'LoRA' if cfg.lora.enabled else 'UNet'} saved to {final}")
    accelerator.wait_for_everyone()
    finish_run(accelerator, output_dir, log)
    return final
