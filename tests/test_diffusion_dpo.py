"""Diffusion-DPO: the loss against hand-derived numbers, the noised inputs, image rows and their errors, and
training runs on a tiny Stable-Diffusion-layout pipeline built here (UNet block channels (4, 8), a 2-layer CLIP
text encoder, a 2-block VAE, a DDPM scheduler, a word-level tokenizer): step 0, learning, resume, and the
LoRA loaded back through diffusers."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.training.loop import RunInterrupted

pytest.importorskip("diffusers")

from conftest import REPO, ctrl_c, train_metrics  # noqa: E402

from alignkit.algorithms import diffusion_dpo  # noqa: E402
from alignkit.algorithms.diffusion_dpo import DenoisingPairs, NoiseDraws  # noqa: E402
from alignkit.config.base import LoraSettings
from alignkit.config.load import ConfigError
from alignkit.config.preference import DiffusionDPOConfig
from alignkit.data.image_pairs import load_image_pairs, pixel_values, size_time_ids  # noqa: E402
from alignkit.data.readers import DataError  # noqa: E402
from alignkit.losses.diffusion import denoising_mse, diffusion_dpo_loss  # noqa: E402
from alignkit.models.diffusion import Pipeline, add_unet_lora, save_unet  # noqa: E402

# The tiny pipeline and the colour pairs are the example's (examples/diffusion_dpo/synthetic.py), so that the
# offline smoke run the docs show and these tests use one builder.
_spec = importlib.util.spec_from_file_location(
    "synthetic", REPO / "examples" / "diffusion_dpo" / "synthetic.py"
)
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)
build_tiny_pipeline, write_colour_pairs = synthetic.build_tiny_pipeline, synthetic.write_colour_pairs


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), sdxl=True)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("colours")
    rows = write_colour_pairs(folder, 64)
    return write_jsonl(folder / "train.jsonl", rows[:32]), write_jsonl(folder / "eval.jsonl", rows[32:])


def config(out: Path, pipeline_dir: Path, data: str, **overrides) -> DiffusionDPOConfig:
    settings = {
        "model": str(pipeline_dir),
        "data": data,
        "output_dir": str(out),
        "resolution": 16,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_ratio": 0.0,
        "save_steps": 0,
        "report": False,
        "progress": False,
    }
    settings.update(overrides)
    return DiffusionDPOConfig(**settings)


# ------------------------------------------------------------------------------------------------
# the loss, by hand


def test_loss_matches_hand_computation():
    """Pair 1: e_θ^w = 0.30, e_ref^w = 0.32, e_θ^l = 0.41, e_ref^l = 0.40, so Δ = (−0.02) − (0.01) = −0.03;
    with β = 100, −β/2·Δ = 1.5 and the sigmoid loss is −log σ(1.5) = log(1 + e^−1.5) = 0.201413. Pair 2 is
    the reverse (Δ = +0.03): log(1 + e^1.5) = 1.701413. Pair 3: policy = reference, Δ = 0: ln 2, a tie.
    IPO: h = −Δ/2 = 0.015, 0, −0.015 against the target 1/(2β) = 0.005: (0.01)², (−0.005)², (−0.02)²."""
    pc, pr = torch.tensor([0.30, 0.41, 0.5]), torch.tensor([0.41, 0.30, 0.7])
    rc, rr = torch.tensor([0.32, 0.40, 0.5]), torch.tensor([0.40, 0.32, 0.7])
    out = diffusion_dpo_loss(pc, pr, rc, rr, beta=100.0)
    expected = torch.tensor([math.log1p(math.exp(-1.5)), math.log1p(math.exp(1.5)), math.log(2.0)])
    torch.testing.assert_close(out.losses, expected, rtol=0, atol=2e-6)
    assert out.metrics["accuracy"].tolist() == [1.0, 0.0, 0.5]
    # implicit rewards −β/2·(e_θ − e_ref): pair 1 chosen −50·(−0.02) = 1.0, rejected −50·0.01 = −0.5
    torch.testing.assert_close(out.chosen_rewards[0], torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.rejected_rewards[0], torch.tensor(-0.5), atol=1e-5, rtol=0)
    ipo = diffusion_dpo_loss(pc, pr, rc, rr, beta=100.0, loss="ipo")
    torch.testing.assert_close(ipo.losses, torch.tensor([1e-4, 4e-4, 2.5e-5]), atol=1e-8, rtol=1e-4)
    with pytest.raises(ValueError, match="not one of sigmoid, ipo"):
        diffusion_dpo_loss(pc, pr, rc, rr, beta=1.0, loss="hinge")


def test_denoising_mse_is_a_per_sample_mean():
    prediction = torch.zeros(2, 4, 2, 2)
    target = torch.ones(2, 4, 2, 2)
    target[1] = 3.0
    assert denoising_mse(prediction, target).tolist() == [1.0, 9.0]


def test_pairs_share_one_t_and_noise_and_v_targets_follow_the_scheduler():
    """The 2B inputs: rows b and B+b (the two images of pair b) have the same t and ε; the target is ε for
    ε-prediction and the scheduler's velocity α_t·ε − σ_t·x_0 for v-prediction."""
    from diffusers import DDPMScheduler

    class Text(torch.nn.Module):  # stands in for the frozen text encoder: ids -> (B, L, 3)
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 3)

        def forward(self, ids):
            return (self.embed(ids),)

    B = 3
    batch = {
        "input_ids": torch.tensor([[1, 2], [3, 4], [5, 6]]),
        "chosen_latents": torch.randn(B, 4, 2, 2),
        "rejected_latents": torch.randn(B, 4, 2, 2),
    }
    for prediction in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(num_train_timesteps=50, prediction_type=prediction)
        pipeline = Pipeline(None, None, [Text()], [], scheduler)
        objective = DenoisingPairs(DiffusionDPOConfig(), pipeline, None, NoiseDraws(0))
        inputs = objective.inputs(batch, torch.Generator().manual_seed(0))
        t = inputs["timesteps"]
        assert torch.equal(t[:B], t[B:]) and inputs["noisy"].shape == (2 * B, 4, 2, 2)
        x0 = torch.cat([batch["chosen_latents"], batch["rejected_latents"]])
        alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        eps = (inputs["noisy"] - alpha * x0) / sigma  # the noise that was added
        torch.testing.assert_close(eps[:B], eps[B:], atol=1e-4, rtol=0)
        expected = eps if prediction == "epsilon" else alpha * eps - sigma * x0
        torch.testing.assert_close(inputs["target"], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(inputs["context"][:B], inputs["context"][B:])


# ------------------------------------------------------------------------------------------------
# image rows


def test_bad_images_are_all_reported_with_file_line_and_field(tmp_path):
    from PIL import Image

    rows = write_colour_pairs(tmp_path, 2)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("I;16", (4, 4)).save(tmp_path / "images" / "deep.png")
    png = (tmp_path / rows[0]["chosen_image"]).read_bytes()
    bad = [
        rows[0],  # line 1: fine
        {**rows[1], "chosen_image": "images/missing.png"},  # 2
        {**rows[1], "rejected_image": "images/broken.png"},  # 3
        {**rows[1], "chosen_image": "images/deep.png"},  # 4: 16-bit greyscale
        {
            "prompt": "",
            "chosen_image": "data:image/png;base64,@@@",
            "rejected_image": rows[1]["chosen_image"],
        },  # 5
        {
            "caption": "x",
            "jpg_0": rows[0]["chosen_image"],
            "jpg_1": rows[0]["chosen_image"],
            "label_0": 2,
        },  # 6
    ]
    source = write_jsonl(tmp_path / "pairs.jsonl", bad)
    with pytest.raises(DataError) as info:
        load_image_pairs(source)
    message = str(info.value)
    assert f"{source}:2: field 'chosen_image': no such file" in message
    assert f"{source}:3: field 'rejected_image': cannot read the image" in message
    assert f"{source}:4: field 'chosen_image': image mode I;16 does not convert to RGB" in message
    assert (
        f"{source}:5: field 'prompt'" in message
        and f"{source}:5: field 'chosen_image': not valid base64" in message
    )
    assert f"{source}:6: field 'label_0'" in message
    assert info.value.count == 6  # every problem, in one pass

    # The same rows with on_bad_rows=skip semantics: only line 1 kept, five rows listed as dropped.
    skipped = []
    kept = load_image_pairs(source, skipped=skipped)
    assert [r.line for r in kept.rows] == [1] and [d.line for d in skipped] == [2, 3, 4, 5, 6]

    # Pick-a-Pic: label_0 = 0 prefers jpg_1, a tie (0.5) is dropped and counted; bytes and base64 both load.
    b64 = base64.b64encode(png).decode()
    pick = [
        {"caption": "a", "jpg_0": rows[0]["chosen_image"], "jpg_1": b64, "label_0": 0},
        {"caption": "b", "jpg_0": b64, "jpg_1": rows[0]["rejected_image"], "label_0": 0.5},
        {
            "caption": "c",
            "jpg_0": {"bytes": png, "path": None},
            "jpg_1": rows[0]["rejected_image"],
            "label_0": 1,
        },
    ]
    pick[2]["jpg_0"] = f"data:image/png;base64,{b64}"
    pairs = load_image_pairs(write_jsonl(tmp_path / "pick.jsonl", pick))
    assert pairs.ties == 1 and [r.line for r in pairs.rows] == [1, 3]
    assert pairs.rows[0].chosen == png and pairs.rows[0].rejected == tmp_path / rows[0]["chosen_image"]
    assert pixel_values(pairs.rows[1].chosen, 8).shape == (3, 8, 8)


def test_image_pixels_resize_crop_and_scale(tmp_path):
    """A 4x2 image (left half white, right half black) -> shorter side 8, centre 8x8 crop, values in [-1, 1]."""
    from PIL import Image

    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 2, 2))
    image.save(tmp_path / "half.png")
    pixels = pixel_values(tmp_path / "half.png", 8)
    assert pixels.shape == (3, 8, 8)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[:, :, 0].mean() > 0.9 and pixels[:, :, -1].mean() < -0.9  # white left, black right
    # SDXL's time ids: original (h, w) = (2, 4); resized to 16x8, the 8x8 centre starts at top 0, left 4.
    assert size_time_ids(tmp_path / "half.png", 8) == [2, 4, 0, 4, 8, 8]


# ------------------------------------------------------------------------------------------------
# training runs on the tiny pipeline


def load_pipeline_with_lora(pipeline_dir: Path, lora_dir: Path, sdxl: bool = False):
    """A diffusers StableDiffusion(XL)Pipeline of the tiny parts (no VAE or scheduler needed here) with the
    LoRA loaded as users load one: `pipe.load_lora_weights(folder)`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    parts = {
        "text_encoder": CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder"),
        "tokenizer": AutoTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer"),
        "unet": UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet"),
        "vae": None,
        "scheduler": None,
    }
    if sdxl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            pipeline_dir, subfolder="text_encoder_2"
        )
        parts["tokenizer_2"] = AutoTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer_2")
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.load_lora_weights(lora_dir)
    return pipe


def unet_outputs(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x, context = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 3, unet.config.cross_attention_dim, generator=g),
    )
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {
            "text_embeds": torch.randn(2, 8, generator=g),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10, 60]), encoder_hidden_states=context, added_cond_kwargs=added).sample


def test_step_zero_is_ln2_and_the_trained_lora_loads_in_diffusers(tmp_path, pipeline_dir, colour_data):
    """At step 0 the adapter is a no-op, so policy = reference on every pair: loss ln 2, accuracy 0.5 (all
    ties), equal MSEs. The saved LoRA loads into a diffusers pipeline and changes the UNet's outputs."""
    from diffusers import UNet2DConditionModel

    cfg = config(tmp_path / "out", pipeline_dir, colour_data[0], max_steps=2)
    final = diffusion_dpo.train(cfg)
    first, second = train_metrics(cfg)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/accuracies"] == 0.5
    assert first["mse/policy_chosen"] == pytest.approx(first["mse/reference_chosen"], abs=1e-7)
    assert first["mse/policy_rejected"] == pytest.approx(first["mse/reference_rejected"], abs=1e-7)
    assert second["loss"] != pytest.approx(math.log(2), abs=1e-4)  # one step moved the adapter
    pipe = load_pipeline_with_lora(pipeline_dir, final)
    base = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    assert (unet_outputs(pipe.unet) - unet_outputs(base)).abs().max() > 1e-5


@pytest.mark.parametrize("sdxl", [False, True])
def test_lora_saved_for_diffusers_reproduces_the_unet(tmp_path, pipeline_dir, sdxl_dir, sdxl):
    """save_unet's file, loaded with pipe.load_lora_weights (SD and SDXL pipelines), gives the UNet that was
    saved, output for output."""
    from diffusers import UNet2DConditionModel

    folder = sdxl_dir if sdxl else pipeline_dir
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet = add_unet_lora(unet, DiffusionDPOConfig().lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter (it starts at B = 0)
    final = save_unet(unet, tmp_path / "final", lora=True, sdxl=sdxl)
    pipe = load_pipeline_with_lora(folder, final, sdxl)
    expected = unet_outputs(unet)
    base = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert (expected - unet_outputs(base)).abs().max() > 1e-3
    torch.testing.assert_close(unet_outputs(pipe.unet), expected, atol=1e-6, rtol=0)


def test_sdxl_step_zero_is_ln2_and_its_lora_loads_in_diffusers(tmp_path, sdxl_dir):
    """The SDXL layout trains end to end (Pick-a-Pic rows, time ids from each image's size and crop): step 0
    is ln 2 with accuracy 0.5, and the saved LoRA loads into a StableDiffusionXLPipeline and changes its UNet."""
    from diffusers import UNet2DConditionModel

    rows = write_colour_pairs(tmp_path, 8)
    pick = [
        {"caption": r["prompt"], "jpg_0": r["rejected_image"], "jpg_1": r["chosen_image"], "label_0": 0}
        for r in rows
    ]
    cfg = config(tmp_path / "out", sdxl_dir, write_jsonl(tmp_path / "pick.jsonl", pick), max_steps=2)
    final = diffusion_dpo.train(cfg)
    first, second = train_metrics(cfg)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/accuracies"] == 0.5
    assert second["loss"] != pytest.approx(math.log(2), abs=1e-4)
    pipe = load_pipeline_with_lora(sdxl_dir, final, sdxl=True)
    base = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    assert (unet_outputs(pipe.unet) - unet_outputs(base)).abs().max() > 1e-5


def test_learns_a_colour_preference(tmp_path, pipeline_dir, colour_data):
    """Red squares preferred to blue ones (the whole UNet trained, 20 steps of 8 pairs): after training, the held-out pairs' implicit accuracy (fixed
    t and ε per eval batch, so step 0 would be exactly 0.5) is well above chance and the eval loss below ln 2."""
    train, held_out = colour_data
    cfg = config(
        tmp_path / "out",
        pipeline_dir,
        train,
        eval_data=held_out,
        max_steps=20,
        batch_size=8,
        lr=2e-3,
        beta=100.0,
        eval_steps=100,
        cache_latents=True,
        lora=LoraSettings(enabled=False),
    )
    diffusion_dpo.train(cfg)
    lines = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    final = [m for m in lines if m["split"] == "eval"][-1]
    # Measured (this CPU, fp32): accuracy 28/32 = 0.875, loss 0.269 (ln 2 = 0.693 at step 0). By chance (p = 0.5
    # per pair) 24 or more of 32 has probability 0.0035; the loss bound leaves 0.23 of room above the measured.
    assert final["rewards/accuracies"] >= 0.75
    assert final["loss"] < 0.5
    assert final["rewards/margins"] > 0


def test_interrupted_run_resumes_with_identical_metrics(tmp_path, pipeline_dir, colour_data, monkeypatch):
    """Ctrl-C during step 4 -> step 4 finished, checkpoint-4; resuming repeats the uninterrupted run's losses and MSEs bit for
    bit: the noise generator's draw count is in the checkpoint, so steps 4-5 draw the same t and ε."""
    full = config(tmp_path / "a", pipeline_dir, colour_data[0], max_steps=5)
    diffusion_dpo.train(full)
    keys = ("loss", "mse/policy_chosen", "mse/reference_rejected")
    expected = [[m[k] for k in keys] for m in train_metrics(full)]

    cut = config(tmp_path / "b", pipeline_dir, colour_data[0], max_steps=5)
    original, calls = torch.optim.AdamW.step, []

    def interrupt_on_fourth_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            ctrl_c()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_on_fourth_step)
    with pytest.raises(RunInterrupted):
        diffusion_dpo.train(cut)
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-4").is_dir()
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    cut.resume = True
    diffusion_dpo.train(cut)
    assert [[m[k] for k in keys] for m in train_metrics(cut)] == expected
    assert len(expected) == 5


def test_settings_that_would_be_ignored_are_errors(tmp_path, pipeline_dir, colour_data):
    with pytest.raises(ConfigError, match="max_length is not used by diffusion-dpo"):
        diffusion_dpo.train(config(tmp_path / "a", pipeline_dir, colour_data[0], max_length=64))
    with pytest.raises(ConfigError, match="lora.target_modules=all-linear"):
        diffusion_dpo.train(
            config(tmp_path / "b", pipeline_dir, colour_data[0], lora=LoraSettings(enabled=True))
        )
    with pytest.raises(ConfigError, match="resolution=18 must be a multiple of 4"):
        diffusion_dpo.train(config(tmp_path / "c", pipeline_dir, colour_data[0], resolution=18))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(ValueError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        diffusion_dpo.train(config(tmp_path / "d", tmp_path / "half", colour_data[0]))
