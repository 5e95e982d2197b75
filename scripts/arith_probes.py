"""The two probes behind docs/online_rl.md's "What it took" (RL with verifiable rewards on a CPU), outside
alignkit on purpose, so that what they show is the task's and the model's, not alignkit's:

    python scripts/arith_probes.py grpo --lr 3e-4     # a plain-PyTorch GRPO on the GRPO prompts
    python scripts/arith_probes.py sft --lr 3e-4      # fine-tuning on the same prompts' true answers

Both start from runs/arith/sft/final (`python scripts/build_arithmetic.py`) with a fresh Adam, 16 prompts a
step. `grpo` samples G=16 answers of each (temperature 1, 6 new tokens), rewards exact matches, normalises within
the group and prints the training reward every 25 steps. `sft` prints held-out exact accuracy, greedy and
sampled (temperature 1), every 50 steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1] / "runs" / "arith"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(model, tokenizer, prompts: list[str], repeat: int, temperature: float) -> list[str]:
    """Completions of each prompt (`repeat` each, prompt-major); temperature 0: greedy. The prompts have one
    length (two-digit problems), so no padding."""
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts]).repeat_interleave(repeat, 0)
    sampling = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature}
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, top_k=0,
                             top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)  # fmt: skip
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def accuracy(model, tokenizer, held: list[dict], temperature: float) -> float:
    torch.manual_seed(1)
    texts = generate(model, tokenizer, [r["prompt"] for r in held], 1, temperature)
    return sum(t.strip() == r["answer"] for t, r in zip(texts, held)) / len(held)


def grpo_step(model, tokenizer, part: list[dict], G: int = 16) -> tuple[torch.Tensor, float]:
    """GRPO's loss on one batch of prompts (one update per rollout: the ratio is 1), and its mean reward."""
    texts = generate(model, tokenizer, [r["prompt"] for r in part], G, 1.0)
    reward = torch.tensor([float(t.strip() == part[i // G]["answer"]) for i, t in enumerate(texts)])
    groups = reward.view(len(part), G)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    prompt = torch.tensor([tokenizer(r["prompt"])["input_ids"] for r in part]).repeat_interleave(G, 0)
    completion = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts
    ]
    T = max(map(len, completion))
    comp = torch.tensor([c + [tokenizer.pad_token_id] * (T - len(c)) for c in completion])
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (T - len(c)) for c in completion])
    model.train()
    logits = model(input_ids=torch.cat([prompt, comp], 1)).logits[:, prompt.shape[1] - 1 : -1]
    logps = logits.float().log_softmax(-1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    return -((logps * mask).sum(1) / mask.sum(1) * advantages).mean(), float(reward.mean())


def sft_loss(model, tokenizer, part: list[dict]) -> torch.Tensor:
    seqs = [tokenizer(r["prompt"])["input_ids"] + tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for r in part]  # fmt: skip
    T, P = max(map(len, seqs)), len(tokenizer(part[0]["prompt"])["input_ids"])
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (T - len(s)) for s in seqs])
    mask = (ids != tokenizer.pad_token_id).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :P] = -100
    model.train()
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("grpo", "sft"))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--root", type=Path, default=ROOT, help="build_arithmetic.py's --root")
    args = parser.parse_args()
    print(f"{args.probe} lr {args.lr:g}, {args.steps} steps on {platform.processor() or platform.machine()}")
    torch.manual_seed(0)
    rng = random.Random(0)
    model_dir = args.root / "sft" / "final"
    tokenizer, model = (
        AutoTokenizer.from_pretrained(model_dir),
        AutoModelForCausalLM.from_pretrained(model_dir),
    )
    train, held = rows(args.root / "grpo_prompts.jsonl"), rows(args.root / "heldout.jsonl")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if args.probe == "sft":
        print(f"step 0: held-out greedy {accuracy(model, tokenizer, held, 0):.3f}, "
              f"sampled {accuracy(model, tokenizer, held, 1.0):.3f}")  # fmt: skip
    window: list[float] = []
    for step in range(1, args.steps + 1):
        part = rng.sample(train, 16)
        if args.probe == "grpo":
            loss, reward = grpo_step(model, tokenizer, part)
            window.append(reward)
        else:
            loss = sft_loss(model, tokenizer, part)
        optimizer.zero_grad()
        loss.backward()
        if args.probe == "grpo":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if args.probe == "grpo" and step % 25 == 0:
            print(f"step {step}: training reward (last 25 steps) {sum(window[-25:]) / 25:.3f}")
        if args.probe == "sft" and step % 50 == 0:
            print(f"step {step}: held-out greedy {accuracy(model, tokenizer, held, 0):.3f}, "
                  f"sampled {accuracy(model, tokenizer, held, 1.0):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
