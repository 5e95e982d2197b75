"""ICDPO (Song et al. 2024, "ICDPO: Effectively Borrowing Alignment Capability of Others via In-context
Direct Preference Optimization"): training-free choice among sampled candidates.

The same model plays two parts: with demonstrations of preferred behaviour in its context it is the
"expert", without them the "amateur". Each candidate y of a prompt x is scored by

    s(y) = log p(y | d, x) - log p(y | x)                                          (Song et al., eq. 6)

where d is the demonstration block: the demonstrations most similar to x (`alignkit.inference.retrieval`), each
rendered as one document (`demo_template`, then EOS), the most similar one last, nearest the prompt. s(y)
is the log-ratio DPO's implicit reward takes between an aligned and a reference policy (with β = 1); the
candidate with the largest s is kept. Both log-probs come from `evaluation.compare.completion_nll`, i.e. the one
log-prob primitive `logprobs.completion.completion_logps`, batched.

Context length: every candidate of a prompt sees the same demonstration block, so that their scores are
comparable; when [block | prompt | longest candidate] is longer than the model's context, the block is
cut from its left (the least similar demonstration goes first). The prompt and the candidates are never
cut: a prompt whose longest candidate does not fit even without demonstrations is an error.
"""

from __future__ import annotations

from alignkit.data.prompts import encode_prompt
from alignkit.evaluation.compare import completion_nll


def demonstration_ids(
    prompts: list[str], responses: list[str], tokenizer, template: str = "{prompt}{response}"
) -> list[list[int]]:
    """Token ids of each demonstration as one document: `template` with {prompt} and {response} filled in,
    encoded by the one prompt encoder (`data.prompts.encode_prompt`: one BOS, also when the template
    writes the BOS text), then the EOS id when the tokenizer has one."""
    if "{response}" not in template:
        raise ValueError(f"demo_template must contain {{response}}, got {template!r}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [
        encode_prompt(tokenizer, template.replace("{prompt}", p).replace("{response}", r)) + eos
        for p, r in zip(prompts, responses)
    ]


def demo_block(demo_ids: list[list[int]], retrieved: list[int]) -> list[int]:
    """The demonstrations `retrieved` (most similar first, as `retrieval.retrieve` orders them) laid out
    most similar last, so that it sits next to the prompt and a cut from the left drops the others first."""
    return [t for i in reversed(retrieved) for t in demo_ids[i]]


def fit_demo_block(
    block: list[int], prompt_length: int, longest_completion: int, max_length: int
) -> list[int]:
    """The end of `block` that fits before a prompt of `prompt_length` tokens and its longest candidate in
    `max_length` positions (all of it when it fits). ValueError when prompt and candidate alone exceed it."""
    room = max_length - prompt_length - longest_completion
    if room < 0:
        raise ValueError(
            f"a prompt of {prompt_length} tokens and a candidate of {longest_completion} need "
            f"{prompt_length + longest_completion} positions, more than the model's {max_length} even with "
            "no demonstrations; lower max_prompt_length or generation.max_new_tokens"
        )
    return block[len(block) - room :] if len(block) > room else block


def icdpo_logps(
    model,
    blocks: list[list[int]],
    prompt_ids: list[list[int]],
    completions: list[list[list[int]]],
    *,
    batch_size: int = 16,
) -> tuple[list[list[float]], list[list[float]]]:
    """(log p(y | d, x), log p(y | x)) of every candidate y of every prompt x, summed over y's tokens.

    blocks[i]: the demonstration ids of prompt i (already fitted); prompt_ids[i]: its ids; completions[i]:
    its candidates' ids. Both sets of rows go through `completion_nll` (the log-prob primitive) in one call,
    batched `batch_size` rows at a time, in the model's own distribution (temperature 1).
    """
    with_demos = [block + p for block, p, cs in zip(blocks, prompt_ids, completions) for _ in cs]
    bare = [p for p, cs in zip(prompt_ids, completions) for _ in cs]
    ys = [c for cs in completions for c in cs]
    nll, _ = completion_nll(model, with_demos + bare, ys + ys, batch_size)
    half = len(ys)
    expert, amateur, at = [], [], 0
    for cs in completions:
        expert.append([-v for v in nll[at : at + len(cs)]])
        amateur.append([-v for v in nll[half + at : half + at + len(cs)]])
        at += len(cs)
    return expert, amateur


def icdpo_scores(expert: list[list[float]], amateur: list[list[float]]) -> list[list[float]]:
    """s(y) = log p(y | d, x) - log p(y | x), per prompt and candidate (eq. 6 of Song et al. 2024)."""
    return [[e - a for e, a in zip(es, as_)] for es, as_ in zip(expert, amateur)]


class IcdpoChooser:
    """ICDPO for `alignkit generate` (method=icdpo): the demonstrations of every prompt retrieved once,
    then per chunk of candidates their ICDPO scores and what the output line records about them."""

    def __init__(
        self, demo_ids: list[list[int]], retrieved: list[list[int]], max_length: int, batch_size: int
    ):
        self.demo_ids, self.retrieved = demo_ids, retrieved
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def from_config(cls, cfg, prompts: list[str], tokenizer) -> IcdpoChooser:
        """Reads `cfg.demos` (every bad row at once, file:line: field), renders the demonstrations and
        retrieves `cfg.num_demos` of them for every prompt by `cfg.retriever`."""
        from alignkit.config.tools import ScoreConfig
        from alignkit.inference.retrieval import resolve_backend, retrieve
        from alignkit.rewards.score import read_pairs

        _, demo_prompts, responses = read_pairs(
            ScoreConfig(
                data=cfg.demos, prompt_field=cfg.demo_prompt_field, response_field=cfg.demo_response_field
            )
        )
        backend = resolve_backend(cfg.retriever, cfg.embedding_model)
        print(
            f"{len(demo_prompts)} demonstrations from {cfg.demos}; retrieving {cfg.num_demos} per prompt by {backend}"
        )
        retrieved = retrieve(
            prompts,
            demo_prompts,
            min(cfg.num_demos, len(demo_prompts)),
            backend,
            model_path=cfg.embedding_model,
        )
        demo_ids = demonstration_ids(demo_prompts, responses, tokenizer, cfg.demo_template)
        return cls(demo_ids, retrieved, cfg.max_length, cfg.scoring_batch_size)

    def __call__(self, model, candidates, indices) -> list[dict]:
        """Per prompt (`candidates[i]` is prompt `indices[i]`): {candidates: {icdpo, logp_demos, logp}
        (lists over its candidates), demos (the retrieved rows, 0-based, most similar first),
        demo_tokens_cut (tokens cut from the block's left to fit the context)}."""
        max_length = self.max_length or getattr(model.config, "max_position_embeddings", None)
        if not max_length:
            raise ValueError("the model's config has no max_position_embeddings: set max_length")
        blocks, cuts = [], []
        for c, i in zip(candidates, indices):
            block = demo_block(self.demo_ids, self.retrieved[i])
            fitted = fit_demo_block(
                block, len(c.prompt_ids), max(len(y) for y in c.completion_ids), max_length
            )
            blocks.append(fitted)
            cuts.append(len(block) - len(fitted))
        expert, amateur = icdpo_logps(
            model,
            blocks,
            [c.prompt_ids for c in candidates],
            [c.completion_ids for c in candidates],
            batch_size=self.batch_size,
        )
        scores = icdpo_scores(expert, amateur)
        return [
            {
                "candidates": {"icdpo": s, "logp_demos": e, "logp": a},
                "demos": self.retrieved[i],
                "demo_tokens_cut": cut,
            }
            for s, e, a, i, cut in zip(scores, expert, amateur, indices, cuts)
        ]
