"""Tokenisation: the prompt/completion boundary, EOS, truncation."""

from alignkit.data.rows import PreferenceRow
from alignkit.data.tokenize import encode_prompt_completions, tokenize_preference_rows, truncate


def test_boundary_merge_keeps_every_completion_character_in_the_mask(tokenizer):
    # TinyStories glues the word boundary onto the end of a piece: 'time' + ' there' -> 'e▁' spans both.
    prompt, completion = "Once upon a time", " there was a dog"
    naive_prompt = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + completion)["input_ids"]
    assert full[: len(naive_prompt)] != naive_prompt  # the naive cut would be wrong here

    prompt_ids, (completion_ids,) = encode_prompt_completions(tokenizer, prompt, [completion])
    assert prompt_ids + completion_ids[:-1] == full  # the sequence is the natural tokenisation
    assert completion_ids[-1] == tokenizer.eos_token_id
    # the prompt tokens lie wholly inside the prompt text ...
    assert tokenizer.decode(prompt_ids, skip_special_tokens=True) == "Once upon a tim"
    # ... and the completion tokens hold every completion character (plus the merged 'e').
    text = tokenizer.decode(completion_ids[:-1])
    assert text.replace(" ", "") == "e" + completion.replace(" ", "")


def test_clean_boundary_is_the_plain_split(tokenizer):
    prompt, completion = "Once upon a time there", " was a dog"
    prompt_ids, (completion_ids,) = encode_prompt_completions(tokenizer, prompt, [completion])
    full = tokenizer(prompt + completion)["input_ids"]
    assert prompt_ids + completion_ids == full + [tokenizer.eos_token_id]
    assert prompt_ids[0] == tokenizer.bos_token_id


def test_pair_shares_one_prompt(tokenizer):
    prompt_ids, (chosen, rejected) = encode_prompt_completions(
        tokenizer, "Once upon a time", [" there was a happy dog", ", a sad cat cried"]
    )
    for completion, ids in ((" there was a happy dog", chosen), (", a sad cat cried", rejected)):
        assert prompt_ids + ids[:-1] == tokenizer("Once upon a time" + completion)["input_ids"]


def test_truncation_keeps_prompt_end_and_bos_and_cuts_completion_right():
    prompt, (c1, c2) = truncate(
        [1, 10, 11, 12, 13, 14],
        [[20, 21, 22, 23, 2], [30, 2]],
        max_length=7,
        max_prompt_length=4,
        bos_token_id=1,
    )
    assert prompt == [1, 12, 13, 14]
    assert c1 == [20, 21, 22] and c2 == [30, 2]


def test_rows_without_completion_tokens_are_dropped_and_counted(tokenizer):
    long_prompt = "Once upon a time " * 40
    rows = [
        PreferenceRow(prompt="Once upon a time", chosen=" there was a dog", rejected=" a cat", line=1),
        PreferenceRow(prompt=long_prompt, chosen=" yes", rejected=" no", line=2),
    ]
    examples, stats = tokenize_preference_rows(rows, tokenizer, max_length=16, max_prompt_length=16)
    assert [e["line"] for e in examples] == [1]
    assert stats.dropped_empty == 1 and stats.truncated_prompts == 1


def test_pretokenised_rows_are_used_as_given(tokenizer):
    row = PreferenceRow(
        prompt="x", chosen="y", rejected="z", prompt_ids=[1, 5, 6], chosen_ids=[7, 8], rejected_ids=[9, 2]
    )
    (example,), _ = tokenize_preference_rows([row], tokenizer, max_length=64, max_prompt_length=32)
    assert (example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]) == (
        [1, 5, 6],
        [7, 8],
        [9, 2],
    )
    assert example["preference"] == 1.0
