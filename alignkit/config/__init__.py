"""Every command's config, one module per family, each a dataclass with a one-line docstring under every
field (what `alignkit <command> --help` shows) that declares its own value ranges (`ranges`, `relations`):

- `base`: TrainConfig, what every training command shares, and its settings sections (LoRA, reference);
- `supervised`: sft, reward, offline-rl, distill (a given target: completions, pairs' labels, logged
  rewards, a teacher's distributions);
- `preference`: dpo, kto, listwise (sharing PreferenceConfig), iterative-dpo, diffusion-dpo (a preference
  objective against a reference);
- `online`: grpo, rloo, ppo, online-dpo (the policy's own samples, scored while it trains);
- `tools`: the commands that train nothing themselves: eval and generate (sharing PromptRendering), score,
  sweep, report, demo;
- `generation`: the `generation:` section of every command that samples (backend, sampling fields, vLLM).

`load` reads YAML and `key=value` overrides, coerces and range-checks them and writes `--help`; `checks`
holds the checks that span sections. The config layer imports nothing above alignkit.io: where an
implementation higher up keys a table by a setting's names (models.load.DTYPES, a loss registry), the names
are declared here and a test checks that the two agree.
"""
