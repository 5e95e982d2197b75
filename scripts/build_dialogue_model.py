"""Build the small dialogue model of the "less offensive replies" PPO case study (docs/ppo.md), offline.

The seed use case in miniature: a dialogue model that picked up offensive language from its training data,
then aligned with PPO against an offensive-language classifier. Everything comes from the HH sample shipped
in examples/data (red-teaming dialogues: both the chosen and the rejected replies contain offensive text):

1. a 4,096-token byte-level BPE tokenizer trained on the sample's transcripts;
2. a randomly initialised Llama (hidden 128, 4 layers: 1.8M parameters by default);
3. `alignkit sft` on the first 1,400 rows' prompts with BOTH replies as completions (2 x 1,400 rows),
   so the model imitates what the red-teamed assistants said, offensive replies included;
4. the distinct prompts of the last 200 rows that no training row shares, as held-out prompts.

    python scripts/build_dialogue_model.py                  # -> runs/dialogue/{tokenizer,init,sft/final}, prompts
    alignkit ppo examples/ppo/less_offensive.yaml           # PPO against alt-profanity-check

Outputs under --root (default runs/dialogue): sft_rows.jsonl, train_prompts.jsonl, heldout_prompts.jsonl,
init/ (tokenizer + random model), sft/ (the alignkit sft run; sft/final is the dialogue model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO / "examples" / "data" / "hh-harmless-1600.jsonl"
HELD_OUT = 200


def hh_tokenizer(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer (<pad> 0, <s> 1, </s> 2) trained on `texts`, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_llama(path: Path, tokenizer, *, hidden: int, layers: int, seed: int = 0) -> Path:
    """A seeded, randomly initialised Llama for `tokenizer`, saved with it like a hub checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=(8 * hidden) // 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_rows(root: Path) -> None:
    """sft_rows.jsonl (prompt + each reply of the first rows), train_prompts.jsonl and
    heldout_prompts.jsonl (the distinct prompts of the last HELD_OUT rows that no training row has)."""
    from alignkit.data.load import load_preference_rows

    rows = load_preference_rows(str(HH)).rows
    train = rows[:-HELD_OUT]
    seen = {r.prompt for r in train}  # HH repeats prompts across pairs: keep held-out prompts unseen
    held_out = [r for r in rows[-HELD_OUT:] if not (r.prompt in seen or seen.add(r.prompt))]
    with open(root / "sft_rows.jsonl", "w") as f:
        for r in train:
            for reply in (r.chosen, r.rejected):
                f.write(json.dumps({"prompt": r.prompt, "completion": reply}) + "\n")  # EOS added by sft
    for name, part in (("train_prompts", train), ("heldout_prompts", held_out)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in part))


def build(root: Path, *, hidden: int = 128, layers: int = 4, sft_args: list[str] | None = None) -> Path:
    """Steps 1-4 of the module docstring; returns the dialogue model's folder (root/sft/final)."""
    from alignkit.cli import main as alignkit

    root.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)[k] for line in open(HH) for k in ("chosen", "rejected")]
    random_llama(root / "init", hh_tokenizer(texts), hidden=hidden, layers=layers)
    write_rows(root)
    args = [
        "sft",
        f"model={root / 'init'}",
        f"data={root / 'sft_rows.jsonl'}",
        f"output_dir={root / 'sft'}",
        "epochs=1",
        "lr=1e-3",
        "batch_size=16",
        "max_length=320",
        "max_prompt_length=192",
        "warmup_ratio=0.05",
        "lr_scheduler=cosine",
        "save_steps=0",
        *(sft_args or []),
    ]
    if alignkit(args) != 0:
        raise SystemExit("alignkit sft failed")
    return root / "sft" / "final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "dialogue")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("sft_args", nargs="*", help="extra key=value settings for alignkit sft")
    args = parser.parse_args()
    print(
        f"dialogue model: {build(args.root, hidden=args.hidden, layers=args.layers, sft_args=args.sft_args)}"
    )


if __name__ == "__main__":
    main()
