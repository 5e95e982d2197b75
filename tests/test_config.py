"""Configs: YAML + overrides, unknown keys, types, help text, the resolved config on disk."""

import dataclasses
from typing import ClassVar

import pytest
import yaml

from alignkit.cli import main
from alignkit.config.load import ConfigError, describe, field_docs, load_config, save_config
from alignkit.config.preference import ConstraintSettings, DPOConfig, KTOConfig, ListwiseConfig
from alignkit.config.supervised import SFTConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nbeta: 0.3\ntrain:\n  lr: 1.0e-4\nlora:\n  enabled: true\n  r: 4\n")
    cfg = load_config(DPOConfig, str(path), ["beta=0.2", "train.lr=5e-6", "lora.alpha=8", "max_steps=20"])
    assert (cfg.model, cfg.beta, cfg.lr, cfg.max_steps) == ("m", 0.2, 5e-6, 20)
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha) == (True, 4, 8)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'betta'.*Did you mean 'beta'"):
        load_config(DPOConfig, None, ["betta=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'.*Did you mean 'lora.r'"):
        load_config(DPOConfig, None, ["lora.rank=4"])
    path = tmp_path / "bad.yaml"
    path.write_text("lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml:1: unknown config key 'lerning_rate'"):
        load_config(SFTConfig, str(path))
    with pytest.raises(ConfigError, match="unknown config key 'beta'"):
        load_config(SFTConfig, None, ["beta=0.1"])  # SFT has no β: not silently ignored


@dataclasses.dataclass
class _Section:
    """A section."""

    size: int = 1
    """A section's setting."""


@dataclasses.dataclass
class _Moved:
    """A config some of whose keys moved into a section."""

    name: str = ""
    """A setting that stayed."""
    section: _Section = dataclasses.field(default_factory=lambda: _Section(size=2))
    """The section the keys moved into."""

    moved: ClassVar[dict] = {"size": "section.size", "old": ("name", "it names the run now")}


def test_a_moved_key_is_refused_with_its_new_name_wherever_config_arrives(tmp_path):
    """A class's `moved` keys (config.load.moved_key): from a YAML file (with its line), `key=value`, a
    mapping (build_config), a held mapping (from_mapping, with where it is); a note follows the new name."""
    from alignkit.config.load import build_config, from_mapping

    path = tmp_path / "run.yaml"
    path.write_text("name: a\nsection:\n  size: 3\nsize: 4\n")
    expected = "'size' moved: write section.size (a `section:` section in YAML)"
    with pytest.raises(ConfigError) as e:
        load_config(_Moved, str(path))
    assert str(e.value) == f"{path}:4: {expected}"
    with pytest.raises(ConfigError) as e:
        load_config(_Moved, None, ["size=4"])
    assert str(e.value) == expected
    with pytest.raises(ConfigError) as e:
        build_config(_Moved, {"old": "b"})
    assert str(e.value) == "'old' moved: write name; it names the run now"
    with pytest.raises(ConfigError) as e:
        from_mapping(_Moved, {"size": 4}, "points[0]")
    assert str(e.value) == "'points[0].size' moved: write section.size (a `section:` section in YAML)"
    # A section's keys, nested or dotted, are set on the class's own defaults for it.
    assert load_config(_Moved, None, ["section.size=5"]).section.size == 5
    assert from_mapping(_Moved, {"name": "c"}).section.size == 2
    assert from_mapping(_Moved, {"section": {}}).section.size == 2
    assert from_mapping(_Moved, {"section.size": 6}).section.size == 6


def test_help_shows_a_section_under_its_docstring_at_the_command_defaults():
    assert "  section.*\n      The section the keys moved into.\n  section.size = 2\n" in describe(_Moved)


def test_type_errors():
    with pytest.raises(ConfigError, match="'max_steps': expected an integer, got 'ten'"):
        load_config(DPOConfig, None, ["max_steps=ten"])
    with pytest.raises(ConfigError, match="'lora.enabled': expected true or false"):
        load_config(DPOConfig, None, ["lora.enabled=maybe"])
    assert load_config(DPOConfig, None, ["eval_data=null"]).eval_data is None


def test_every_field_is_documented():
    import dataclasses

    from alignkit.commands import COMMANDS

    for cls in (ConstraintSettings, *(command.config_class for command in COMMANDS.values())):
        docs = field_docs(cls)
        assert all(docs.get(f.name) for f in dataclasses.fields(cls)), cls
    text = describe(DPOConfig)
    assert "beta = 0.1\n      Strength of the KL tie" in text
    assert "lora.r = 16" in text


def test_preference_configs_share_their_base_and_keep_their_own_defaults_and_help():
    """dpo, kto and listwise take lr, beta, loss and reference from PreferenceConfig; each keeps its own
    objective, and its own words for beta in --help."""
    from alignkit.config.preference import PreferenceConfig

    for cls, loss, beta_doc in (
        (DPOConfig, "sigmoid", "(DPO's β); for orpo, λ"),
        (KTOConfig, "kto", "(KTO's β)"),
        (ListwiseConfig, "soft", "Scale β of the implicit rewards"),
    ):
        cfg = cls()
        assert isinstance(cfg, PreferenceConfig)
        assert (cfg.lr, cfg.beta, cfg.loss, cfg.reference.mode) == (5e-7, 0.1, loss, "precomputed")
        assert beta_doc in field_docs(cls)["beta"]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        DPOConfig, None, ["beta=0.25", "lora.r=2", "constraints=[{type: nll_anchor, weight: 0.1}]"]
    )
    assert cfg.constraints == [ConstraintSettings(type="nll_anchor", weight=0.1)]
    path = save_config(cfg, tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data["beta"] == 0.25 and data["lora"]["r"] == 2
    again = load_config(DPOConfig, str(path))
    assert again == cfg


def test_cli_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "dpo" in out and "sft" in out and "demo" in out
    assert main(["dpo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "label_smoothing = 0.0" in out and "Conservative DPO" in out
    assert main(["dpoo"]) == 2
    assert "Did you mean 'dpo'" in capsys.readouterr().err
    assert main(["dpo", "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def test_yaml_no_is_a_string_not_a_boolean(tmp_path):
    # YAML 1.1 reads `no` as false; `mixed_precision: no` must stay the string 'no'.
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\ngradient_checkpointing: true\n")
    cfg = load_config(DPOConfig, str(path), ["lora.enabled=false"])
    assert cfg.mixed_precision == "no" and cfg.gradient_checkpointing is True and cfg.lora.enabled is False
    assert load_config(DPOConfig, None, ["mixed_precision=no"]).mixed_precision == "no"


def test_every_range_is_checked_at_load_time_naming_the_key():
    from alignkit.config.online import GRPOConfig

    with pytest.raises(ConfigError) as err:
        load_config(
            SFTConfig, None, ["lora.r=-1", "lr=-1", "batch_size=0", "grad_accum=0", "warmup_ratio=1.5"]
        )
    message = str(err.value)
    for part in (
        "'lora.r' must be >= 1, got -1",
        "'lr' must be > 0, got -1.0",
        "'batch_size' must be >= 1, got 0",
        "'grad_accum' must be >= 1, got 0",
        "'warmup_ratio' must be in [0, 1], got 1.5",
    ):
        assert part in message
    with pytest.raises(
        ConfigError, match=r"'max_length' \(128\) must be greater than 'max_prompt_length' \(200\)"
    ):
        load_config(DPOConfig, None, ["max_length=128", "max_prompt_length=200"])
    with pytest.raises(
        ConfigError, match="'lr_scheduler' must be one of linear, cosine, constant, got 'cosin'"
    ):
        load_config(SFTConfig, None, ["lr_scheduler=cosin"])
    with pytest.raises(ConfigError, match=r"'generation.top_p' must be in \(0, 1\], got 0.0"):
        load_config(GRPOConfig, None, ["generation.top_p=0"])
    with pytest.raises(ConfigError, match="'on_bad_rows' must be one of refuse, skip"):
        load_config(SFTConfig, None, ["on_bad_rows=drop"])
    # documented special values stay valid: 0 = off / never / all, -1 = from epochs
    cfg = load_config(
        GRPOConfig, None, ["generation.top_k=0", "beta=0", "minibatch_size=0", "save_steps=0", "max_steps=-1"]
    )
    assert (cfg.generation.top_k, cfg.beta, cfg.minibatch_size, cfg.save_steps, cfg.max_steps) == (
        0,
        0,
        0,
        0,
        -1,
    )
    assert load_config(SFTConfig, None, ["max_steps=0", "max_grad_norm=0", "eval_fraction=0"]).max_steps == 0


def test_range_errors_are_one_line_before_anything_loads(capsys):
    assert main(["sft", "model=/nowhere", "data=/nowhere.jsonl", "batch_size=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "alignkit sft: 'batch_size' must be >= 1, got 0"


def test_every_declared_range_names_a_field_of_its_class():
    """Ranges are declared on the config classes and read through each class's MRO: a key naming no field
    (a typo, or a field renamed) would check nothing, silently; a relation must be a function."""
    import dataclasses

    from alignkit.commands import COMMANDS
    from alignkit.config.load import Range

    classes = {ConstraintSettings}
    for command in COMMANDS.values():
        cfg = command.config_class()
        classes |= {k for k in type(cfg).__mro__ if dataclasses.is_dataclass(k)}
        classes |= {
            type(v) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(v := getattr(cfg, f.name))
        }
    assert len(classes) > 20
    for klass in classes:
        names = {f.name for f in dataclasses.fields(klass)}
        ranges = vars(klass).get("ranges", {})
        assert set(ranges) <= names, f"{klass.__name__}.ranges names no field: {set(ranges) - names}"
        assert all(isinstance(r, Range) or (isinstance(r, tuple) and r) for r in ranges.values()), klass
        assert all(callable(check) for check in vars(klass).get("relations", ())), klass


def test_the_names_a_config_accepts_are_the_implementations_keys():
    """A config module imports nothing above io, so where an implementation higher up keys a table by a
    setting's names, the names are declared in the config: adding an implementation without its name (or a
    name without its implementation) fails here, not in a user's run."""
    from alignkit.config.base import DTYPE_NAMES, TrainConfig
    from alignkit.config.online import POLICY_LOSS_NAMES, SAMPLER_CORRECTIONS, GRPOConfig, OnlineConfig
    from alignkit.config.preference import DIFFUSION_LOSS_NAMES, DiffusionDPOConfig
    from alignkit.config.supervised import DIVERGENCE_NAMES, DistillConfig
    from alignkit.config.tools import EvalConfig, GenerateConfig
    from alignkit.losses.diffusion import DIFFUSION_LOSSES
    from alignkit.losses.distill import DIVERGENCES
    from alignkit.losses.off_policy import SAMPLER_WEIGHTINGS
    from alignkit.losses.policy import ADVANTAGES
    from alignkit.losses.policy_losses import POLICY_LOSSES
    from alignkit.models.load import DTYPES

    assert DTYPE_NAMES == tuple(DTYPES)
    assert (
        TrainConfig.ranges["dtype"]
        == EvalConfig.ranges["dtype"]
        == GenerateConfig.ranges["dtype"]
        == DTYPE_NAMES
    )
    assert DIFFUSION_LOSS_NAMES == tuple(DIFFUSION_LOSSES) == DiffusionDPOConfig.ranges["loss"]
    assert DIVERGENCE_NAMES == tuple(DIVERGENCES) == DistillConfig.ranges["divergence"]
    assert GRPOConfig.ranges["advantage"] == tuple(ADVANTAGES)
    assert POLICY_LOSS_NAMES == tuple(POLICY_LOSSES) == GRPOConfig.ranges["policy_loss"]
    assert (
        SAMPLER_CORRECTIONS
        == ("auto", "none", *SAMPLER_WEIGHTINGS)
        == OnlineConfig.ranges["sampler_correction"]
    )


def test_mapping_fields_load_from_yaml_sections_and_dotted_overrides(tmp_path):
    """A free-form dict field (a judge spec, a sweep's eval settings) is not a config section: YAML nesting
    and key.sub=value overrides fill the mapping key by key, nested keys included."""
    from alignkit.config.online import OnlineDPOConfig
    from alignkit.config.tools import SweepConfig

    path = tmp_path / "sweep.yaml"
    path.write_text("eval:\n  prompts: p.jsonl\n  num_samples: 2\nsettings:\n  lora: {enabled: true, r: 4}\n")
    cfg = load_config(
        SweepConfig, str(path), ["eval.num_samples=8", "settings.lora.r=16", "settings.beta=0.1"]
    )
    assert cfg.eval == {"prompts": "p.jsonl", "num_samples": 8}
    assert cfg.settings == {"lora": {"enabled": True, "r": 16}, "beta": 0.1}
    online = load_config(OnlineDPOConfig, None, ["judge.type=judge", "judge.model=m"])
    assert online.judge == {"type": "judge", "model": "m"}
    with pytest.raises(ConfigError, match="'lr' is not a section"):
        load_config(OnlineDPOConfig, None, ["lr.peak=1"])
