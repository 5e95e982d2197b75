"""The group judge (`type: group_judge`): an LLM judge ranking each prompt's completions, against a localhost
OpenAI-compatible server this test starts, which ranks responses by how many times they say "good"."""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.config.load import ConfigError
from alignkit.rewards import RewardSet, build_reward
from alignkit.rewards.base import ScoreContext
from alignkit.rewards.group_judge import parse_ranking, ranking_rewards


def _answer(user: str) -> str:
    """A judge that prefers responses saying "good" more often. Listwise: "Ranking: ..." over the numbered
    responses (ties kept in listing order); "[first]" anywhere: always the listing order (a judge with a
    position bias); "[garbage]": no ranking; "[short]": one response left out. Pairwise: the verdict."""
    if "Response A:" in user:
        a = user.split("Response A:")[1].split("Response B:")[0]
        b = user.split("Response B:")[1]
        return f"Verdict: {'A' if a.count('good') >= b.count('good') else 'B'}"
    listed = re.findall(r"Response \[(\d+)\]:\n(.*?)(?=\n\nResponse \[|\n\nGive a short|$)", user, re.DOTALL)
    if "[garbage]" in user:
        return "They are all fine."
    if "[first]" in user:
        order = [n for n, _ in listed]
    else:
        order = [n for n, text in sorted(listed, key=lambda item: -item[1].count("good"))]
    if "[short]" in user:
        order = order[:-1]
    return "Some are better.\nRanking: " + " > ".join(order)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        with self.server.lock:
            self.server.requests.append(user)
        payload = json.dumps({"choices": [{"message": {"content": _answer(user)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.lock, srv.requests = threading.Lock(), []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


def spec(server, **overrides) -> dict:
    base = {
        "type": "group_judge",
        "model": "judge",
        "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
        "max_retries": 0,
        "parse_retries": 1,
    }
    return {**base, **overrides}


def test_ranking_parse_and_rewards_by_hand():
    """Ranking 2 > 3 > 1 of three: response 2 is best (1), 3 middle ((3−1−1)/2 = 0.5), 1 worst (0)."""
    assert parse_ranking("Thoughts.\n**Ranking:** [2] > [3] > [1]", 3) == ((2, 3, 1), None)
    assert ranking_rewards((2, 3, 1)) == [0.0, 1.0, 0.5]
    assert parse_ranking("Ranking: 2 > 1", 3) == (None, "incomplete")
    assert parse_ranking("Ranking: 2 > 2 > 1", 3) == (None, "incomplete")
    assert parse_ranking("no idea", 3) == (None, "unparseable")


def test_listwise_rewards_follow_the_judges_ranking_within_each_group(server):
    """Two groups, rows interleaved (group ids 0 1 0 1 0 1) to show groups are read from the context, not
    from the rows' order. Group 0: 'good'×2, ×0, ×1 -> rewards 1, 0, 0.5; group 1: ×0, ×3, ×1 -> 0, 1, 0.5.
    Listed in reverse the judge gives the same ranking (it reads content), so order_gap is 0."""
    judge = build_reward(spec(server))
    responses = ["good good", "bad", "meh", "good good good", "good", "good"]
    groups = [0, 1, 0, 1, 0, 1]
    scores = judge.score(["p0", "p1"] * 3, responses, context=ScoreContext(group_ids=groups))
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0, 0.5, 0.5]
    metrics = judge.metrics()
    assert metrics["groups_ranked"] == 2 and metrics["judge_answers"] == 4  # 2 groups x both orders
    assert float(metrics["order_gap"]) == 0.0


def test_both_orders_cancel_a_judge_that_ranks_the_first_listed_response_best(server):
    """A judge that always answers the listing order: asked once, rewards 1, 0.5, 0 by position alone; asked
    forwards and reversed, every response gets (1 + 0)/2, (0.5 + 0.5)/2, (0 + 1)/2 = 0.5, and the gap between
    the orders is (1 + 0 + 1)/3 = 2/3."""
    responses = ["[first] a", "b", "c"]
    one_order = build_reward(spec(server, both_orders=False))
    assert one_order.score(["p"] * 3, responses, context=ScoreContext(group_ids=[0, 0, 0])).tolist() == [
        1,
        0.5,
        0,
    ]
    both = build_reward(spec(server))
    assert both.score(["p"] * 3, responses, context=ScoreContext(group_ids=[0, 0, 0])).tolist() == [0.5] * 3
    assert float(both.metrics()["order_gap"]) == pytest.approx(2 / 3)


def test_unreadable_rankings_and_single_completions_are_no_opinion(server):
    """A group whose ranking cannot be read (after a repair turn) or leaves a response out, and a group of one,
    get NaN: the reward set's total for them is NaN (no source has an opinion), the other group is scored."""
    rewards = RewardSet([build_reward(spec(server))])
    responses = ["[garbage] x", "y", "[short] good", "bad", "alone", "good", "bad"]
    groups = [0, 0, 1, 1, 2, 3, 3]
    out = rewards(["p"] * 7, responses, context=ScoreContext(group_ids=groups))
    assert [math.isnan(v) for v in out.total.tolist()] == [True] * 5 + [False] * 2
    assert out.total[5:].tolist() == [1.0, 0.0]
    m = rewards.sources[0].metrics()
    assert (m["fallbacks"], m["single"], m["groups_ranked"]) == (2, 1, 3)
    assert m["judge_parse_retries"] >= 2  # each unreadable answer was asked again once


def test_round_robin_is_the_pairwise_win_rate(server):
    """Round robin of 3 with a judge preferring more 'good' (ties to A, asked in both orders): 'good good'
    beats both (1), 'good' beats 'x' (0.5), 'x' loses both (0)."""
    judge = build_reward(spec(server, ranking="round_robin"))
    scores = judge.score(["p"] * 3, ["x", "good good", "good"], context=ScoreContext(group_ids=[0, 0, 0]))
    assert scores.tolist() == [0.0, 1.0, 0.5]


def test_refusals_name_what_to_change(server):
    with pytest.raises(ValueError, match="ranks the completions of one prompt"):
        build_reward(spec(server)).score(["p"], ["a"], context=ScoreContext())
    with pytest.raises(ValueError, match="use it where groups are sampled"):  # `alignkit score`: no groups
        RewardSet([build_reward(spec(server))])(["p"], ["a"])
    with pytest.raises(ConfigError, match="ranking 'borda'"):
        build_reward(spec(server, ranking="borda"))
    with pytest.raises(ConfigError, match="needs \\{responses\\}"):
        build_reward(spec(server, template="Rank {prompt}"))
    with pytest.raises(ConfigError, match="'fallback' has no effect"):
        build_reward(spec(server, fallback=0.5))
    with pytest.raises(ConfigError, match="both_orders is read by ranking=listwise"):
        build_reward(spec(server, ranking="round_robin", both_orders=False))


def test_a_group_judge_ranks_each_group_of_a_real_rollout(server, tiny_model_dir):
    """collect() hands the reward set each completion's group: 2 prompts x G=3 sampled from a tiny model are
    ranked per prompt, one ranking (two orders) per group. Each order's rewards are 0, 0.5 and 1, so a group's
    rewards, averaged over the two orders, sum to 1.5 whatever the ranking (ties included)."""
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import load_tokenizer
    from alignkit.rollout import SamplingSettings, collect

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompts = ["Once upon a time", "The dog"]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    judge = build_reward(spec(server))
    rollout = collect(
        model,
        tokenizer,
        ids,
        prompts,
        rewards=RewardSet([judge]),
        group_size=3,
        sampling=SamplingSettings(max_new_tokens=4),
        seed=0,
    )
    groups = rollout.scores.view(2, 3)
    assert groups.sum(-1).tolist() == [1.5, 1.5]
    assert judge.metrics()["groups_ranked"] == 2
