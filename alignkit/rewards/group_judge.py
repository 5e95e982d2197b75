"""An LLM judge that ranks the completions of one prompt against each other (a GRPO group), and turns the
ranking into rewards: `type: group_judge`.

A pointwise judge scores each completion alone, on a scale it has to keep steady across prompts and steps; a
group's advantages only need the order *within* the group, which a judge gives more reliably by comparing
(asked for in TRL, #4707, and closed there as do-it-yourself). Two ways to rank a group of K:

- `round_robin`: every pair asked with the pairwise template, in both orders (`JudgeReward.compare`), and
  each completion's reward its mean win probability against the other K − 1 (a Borda count; the same
  `round_robin_scores` as online-dpo's judge ranking). K(K−1) requests per group.
- `listwise`: one prompt listing the K responses, numbered, asking for "Ranking: 3 > 1 > 2 ..."; the
  completion ranked at position r (0 = best) gets (K − 1 − r) / (K − 1), so the best gets 1 and the worst 0.
  With `both_orders` (the default) the group is asked a second time with the responses listed in reverse,
  and the two rewards averaged: a judge that favours the first-listed response (Zheng et al. 2023) is
  cancelled out, and the gap between the two orders is reported (`order_gap`). 2 requests per group.

The groups are the responses that share a `ScoreContext.group_ids` value (the prompts' indices in a rollout),
so the source reads no row column but needs a caller that samples groups (grpo/rloo, online-dpo,
iterative-dpo); elsewhere it is refused. A group of one completion, or one whose ranking could not be read
after the judge's parse retries, gets NaN, *no opinion*: its rows add nothing to the reward
(`rewards.compose`) and are counted (`fallbacks`, `single`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from alignkit.config.load import ConfigError
from alignkit.rewards.base import Prompt, RowMean, ScoreContext, check_batch, prompt_text
from alignkit.rewards.judge import JudgeOptions, JudgeReward
from alignkit.rewards.judge_answers import ANSWER_LINE, JudgeTemplate, clean_answer
from alignkit.rewards.ranking import round_robin_scores

RANKINGS = ("round_robin", "listwise")

LISTWISE = JudgeTemplate(
    system="You are a careful, impartial judge of responses.",
    user=(
        "Rank the {k} responses to the prompt below from best to worst: more helpful, accurate and harmless "
        "first. Do not let the order of the responses or their length decide.\n\n"
        "Prompt:\n{prompt}\n\n{responses}\n\n"
        f"Give a short justification (one or two sentences), {ANSWER_LINE}\n"
        "Ranking: 2 > 1 > 3\nlisting every response number once, best first."
    ),
    low=0.0,
    high=1.0,
)

_RANKING_LINE = re.compile(r"^[\s*_#`]*ranking[\s*_`]*[:=][\s*_`]*(.+)$", re.IGNORECASE | re.MULTILINE)


def parse_ranking(text: str, k: int) -> tuple[tuple[int, ...] | None, str | None]:
    """((i_1, ..., i_k), None): the 1-based response numbers of the last "Ranking: a > b > ..." line, best
    first, when they are each of 1..k once; else (None, 'unparseable' or 'incomplete')."""
    lines = _RANKING_LINE.findall(clean_answer(text))
    if not lines:
        return None, "unparseable"
    order = tuple(int(n) for n in re.findall(r"\d+", lines[-1]))
    if sorted(order) != list(range(1, k + 1)):
        return None, "incomplete"
    return order, None


def ranking_rewards(order: tuple[int, ...]) -> list[float]:
    """Each listed response's reward from a ranking `order` (1-based numbers, best first) of k ≥ 2:
    (k − 1 − r) / (k − 1) for the response at rank r, in listing order."""
    k = len(order)
    out = [0.0] * k
    for rank, number in enumerate(order):
        out[number - 1] = (k - 1 - rank) / (k - 1)
    return out


@dataclass
class GroupJudgeOptions(JudgeOptions):
    """An LLM judge ranking each group of completions of one prompt (round robin of pairs, or one list)."""

    ranking: str = "listwise"
    """How a group is ranked: listwise (one prompt listing the group, asked for "Ranking: 2 > 1 > 3") or
    round_robin (every pair, both orders; K(K−1) requests per group of K)."""
    both_orders: bool = True
    """listwise: ask a second time with the responses listed in reverse, and average (cancels a judge's
    preference for the first-listed response)."""
    template: str = "auto"
    """auto: the built-in listwise template, or `pairwise` for round_robin; or your own listwise text using
    {prompt}, {responses} (the numbered list) and optionally {k}."""


class GroupJudgeReward:
    """Rewards from an LLM judge's ranking of each group (see the module docstring)."""

    columns: tuple[str, ...] = ()  # reads no row column, but needs the context's group_ids

    def __init__(self, options: GroupJudgeOptions):
        self.options, self.name, self.weight = options, options.name, options.weight
        self.listwise = options.ranking == "listwise"
        if self.listwise:
            text = LISTWISE.user if options.template == "auto" else options.template
            self.template = JudgeTemplate(options.system or LISTWISE.system, text, 0.0, 1.0)
        self.judge = _ListJudge(self._judge_options(options), self)
        self.counts: Counter = Counter()
        self.last_gap: RowMean | None = None

    @staticmethod
    def _judge_options(options: GroupJudgeOptions) -> JudgeOptions:
        """The options of the judge that answers: a pairwise one for round_robin; for listwise the pairwise
        built-in stands in (the list template is applied here, not by `JudgeReward`)."""
        fields = {k: v for k, v in vars(options).items() if k in JudgeOptions.__dataclass_fields__}
        fields.update(template="pairwise", system=None, structured_output="none")
        return JudgeOptions(**fields)

    @staticmethod
    def check(options: GroupJudgeOptions, where: str) -> None:
        if options.ranking not in RANKINGS:
            raise ConfigError(f"{where}: ranking '{options.ranking}' is not one of {', '.join(RANKINGS)}")
        if options.structured_output != "none":
            raise ConfigError(f"{where}: structured_output is not available for a group judge; remove it")
        if options.ranking == "round_robin":
            if options.template not in ("auto", "pairwise") or options.system is not None:
                raise ConfigError(
                    f"{where}: ranking=round_robin asks the built-in pairwise template; remove template/system "
                    "or use ranking=listwise with your own text"
                )
            if not options.both_orders:
                raise ConfigError(
                    f"{where}: both_orders is read by ranking=listwise only (round_robin asks both)"
                )
        elif options.template != "auto" and "{responses}" not in options.template:
            raise ConfigError(
                f"{where}: a listwise template needs {{responses}} (the numbered list of the group)"
            )
        for key in ("min_score", "max_score", "fallback"):
            if getattr(options, key) is not None:
                raise ConfigError(
                    f"{where}: '{key}' has no effect on a group judge (rewards come from the ranking, in [0, 1]; "
                    "an unreadable ranking is no opinion); remove it"
                )
        JudgeReward.check(GroupJudgeReward._judge_options(options), where)

    def score(self, prompts: list[Prompt], responses: list[str], context: ScoreContext) -> torch.Tensor:
        """(B,) rewards in [0, 1] from each group's ranking; NaN for a group of one or an unreadable ranking."""
        check_batch(prompts, responses)
        if context.group_ids is None:
            raise ValueError(
                f"reward source '{self.name}' (group_judge) ranks the completions of one prompt against each "
                "other: use it where groups are sampled (grpo/rloo, online-dpo, iterative-dpo)"
            )
        groups: dict[int, list[int]] = defaultdict(list)
        for row, group in enumerate(context.group_ids):
            groups[group].append(row)
        out = torch.full((len(responses),), float("nan"))
        by_size: dict[int, list[list[int]]] = defaultdict(list)
        for rows in groups.values():
            if len(rows) < 2:
                self.counts["single"] += 1
            else:
                by_size[len(rows)].append(rows)
        gaps: list[float] = []
        for k, size_groups in by_size.items():
            firsts = [prompts[rows[0]] for rows in size_groups]
            texts = [[responses[r] for r in rows] for rows in size_groups]
            if self.listwise:
                scores = self._listwise(firsts, texts, k, gaps)
            else:
                scores = round_robin_scores(self.judge.compare, firsts, texts).float()
            for rows, row_scores in zip(size_groups, scores):
                out[torch.tensor(rows)] = row_scores
            self.counts["groups_ranked"] += len(size_groups)
        self.last_gap = RowMean(sum(gaps) / len(gaps), len(gaps)) if gaps else None
        return out

    def _listwise(
        self, prompts: list[Prompt], groups: list[list[str]], k: int, gaps: list[float]
    ) -> torch.Tensor:
        """(P, k) rewards of `groups` of k responses, from one listwise ranking each (two with both_orders:
        the second with the list reversed, the rewards averaged); a row of NaN where a ranking is unreadable."""
        orders = [list(range(k))] + ([list(range(k - 1, -1, -1))] if self.options.both_orders else [])
        items = []
        for order in orders:
            for p, group in zip(prompts, groups):
                listed = "\n\n".join(f"Response [{n}]:\n{group[i]}" for n, i in enumerate(order, 1))
                user = self.template.user.replace("{prompt}", prompt_text(p)).replace("{k}", str(k))
                items.append((prompt_text(p), listed, user.replace("{responses}", listed)))
        self.judge.expected = k
        answers = self.judge.ask(items)
        P = len(groups)
        per_order = torch.full((len(orders), P, k), float("nan"))
        for o, order in enumerate(orders):
            for g in range(P):
                ranking = answers[o * P + g]
                if ranking is not None:
                    listed_rewards = ranking_rewards(ranking)
                    for n, i in enumerate(order):
                        per_order[o, g, i] = listed_rewards[n]
        unread = per_order.isnan().any(-1).any(0)  # (P,) a group with any order unread gets no opinion
        self.counts["fallbacks"] += int(unread.sum())
        if len(orders) == 2:
            gaps += (per_order[0] - per_order[1]).abs().mean(-1)[~unread].tolist()
        scores = per_order.mean(0)
        scores[unread] = float("nan")
        return scores

    def metrics(self) -> dict[str, float | RowMean]:
        """Counters: groups_ranked, single (groups of one: no opinion), fallbacks (groups whose ranking could
        not be read), the judge's own (answers, parse_retries, position_inconsistent, backend requests ...);
        and order_gap, the mean |reward listed forwards − listed in reverse| of the last batch (listwise)."""
        out: dict[str, float | RowMean] = {f"judge_{k}": v for k, v in self.judge.metrics().items()}
        out.update({k: float(v) for k, v in self.counts.items()})
        if self.last_gap is not None:
            out["order_gap"] = self.last_gap
        return out


class _ListJudge(JudgeReward):
    """The judge's asking machinery (backend, retries with a repair turn, cache) reading rankings of
    `expected` responses instead of scores, for the listwise group judge."""

    def __init__(self, options: JudgeOptions, owner: GroupJudgeReward):
        super().__init__(options)
        self.expected = 0
        if owner.listwise:
            self.template = owner.template

    def _parse(self, answer: str):
        if self.template.pairwise:
            return super()._parse(answer)
        return parse_ranking(answer, self.expected)

    def _repair(self) -> str:
        if self.template.pairwise:
            return super()._repair()
        order = " > ".join(str(n) for n in range(1, self.expected + 1))
        return f"Reply with only one line ranking all {self.expected} responses, best first, e.g.: Ranking: {order}"
