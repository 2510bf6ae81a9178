"""RULER-style long-context tasks: prompts fit their length, are seeded, hold their answers where the
task says, split at the question, and score by exact string match."""

import re

import pytest
import torch

from headlab.core.errors import HeadlabError
from headlab.core.text import load_text
from headlab.probes.scorers.long_tasks import LONG_TASKS, TaskPrompt, task_prompts
from headlab.probes.scorers.words import WORDS

pytestmark = pytest.mark.real_model  # reads the bundled SmolLM2 tokenizer

LENGTH = 600
# how often each answer stands in the context: an assignment chain names each variable twice (as
# target, then as source) but the last once; a common word of a list under 4,096 tokens comes 6 times
ANSWER_COUNTS = {"niah_single": [1], "niah_multikey": [1], "niah_multivalue": [1] * 4,
                 "variable_tracking": [2, 2, 2, 2, 1], "common_words": [6] * 10}
QUESTIONS = {"niah_single": "What is the special magic number for",
             "niah_multikey": "What is the special magic number for",
             "niah_multivalue": "What are all the special magic numbers for",
             "variable_tracking": "Which variables are assigned the value", "common_words": "10 most common words"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from headlab.surgeon.models import model_directory

    return AutoTokenizer.from_pretrained(model_directory("smollm2-135m"))


@pytest.fixture(scope="module")
def haystack():
    return load_text()[:30000]  # about 7,000 tokens of standard-library docstrings


@pytest.fixture(scope="module")
def prompts(tokenizer, haystack):
    return {task: task_prompts(tokenizer, haystack, task, LENGTH, 3, seed=1) for task in LONG_TASKS}


def _parts(tokenizer, prompt: TaskPrompt) -> tuple[str, str]:
    """The decoded context (with the template before it) and the decoded question tail."""
    ids = prompt.input_ids[0]
    return tokenizer.decode(ids[:prompt.question_start]), tokenizer.decode(ids[prompt.question_start:])


def _count(word: str, text: str) -> int:
    return len(re.findall(rf"\b{re.escape(word)}\b", text))



@pytest.mark.parametrize("task", sorted(LONG_TASKS))
def test_prompts_fill_their_length_and_are_seeded(tokenizer, haystack, prompts, task):
    for prompt in prompts[task]:
        assert prompt.task == task and prompt.input_ids.shape == (1, prompt.length)
        assert LENGTH - 8 <= prompt.length <= LENGTH
    again = task_prompts(tokenizer, haystack, task, LENGTH, 3, seed=1)
    assert all(torch.equal(a.input_ids, b.input_ids) and a.answers == b.answers for a, b in zip(again, prompts[task]))
    other = task_prompts(tokenizer, haystack, task, LENGTH, 3, seed=2)
    assert all(a.answers != b.answers for a, b in zip(other, prompts[task]))


@pytest.mark.parametrize("task", sorted(LONG_TASKS))
def test_answers_stand_in_the_context_as_often_as_the_task_says_and_the_tail_is_the_question(tokenizer, prompts, task):
    for prompt in prompts[task]:
        context, tail = _parts(tokenizer, prompt)
        assert [_count(answer, context) for answer in prompt.answers] == ANSWER_COUNTS[task]
        assert QUESTIONS[task] in tail and "Question:" in tail
        assert not any(_count(answer, tail) for answer in prompt.answers)  # no fact lies in the tail
        assert "VAR " not in tail and " is: " not in tail


def test_distractors_and_rare_words_stay_distinct(tokenizer, prompts):
    for prompt in prompts["niah_multikey"]:
        context, _ = _parts(tokenizer, prompt)
        assert len(re.findall(r"The special magic number for [a-z]+-[a-z]+ is: \d{7}\.", context)) == 4
    for prompt in prompts["common_words"]:
        context, _ = _parts(tokenizer, prompt)
        counts = sorted((_count(word, context) for word in WORDS if word not in prompt.answers), reverse=True)
        assert counts[0] == 1 and sum(counts) > 20  # the rest come once each and fill the list


def test_depths_spread_over_the_context(tokenizer, prompts):
    singles = prompts["niah_single"]
    assert [p.depth for p in singles] == pytest.approx([0.1, 0.5, 0.9])
    where = [_parts(tokenizer, p)[0].index(p.answers[0]) / len(_parts(tokenizer, p)[0]) for p in singles]
    assert where[0] < 0.2 and 0.4 < where[1] < 0.6 and 0.8 < where[2] < 0.95
    chain = prompts["variable_tracking"][0]
    context, _ = _parts(tokenizer, chain)
    assert sorted(context.index(f"VAR {name} =") for name in chain.answers) == [
        context.index(f"VAR {name} =") for name in chain.answers]  # the chain in order
    assert all(p.depth is None for p in prompts["common_words"])


def test_score_is_the_fraction_of_answers_found_ignoring_case():
    prompt = TaskPrompt(torch.zeros(1, 3, dtype=torch.long), 2, ("MAPLE", "1234567"), "niah", 3, 0.5)
    assert prompt.score("maple holds 1234567") == 1.0
    assert prompt.score("It is Maple.") == 0.5
    assert prompt.score("nothing here") == 0.0


@pytest.mark.parametrize("bad, message", [
    (dict(task="niah_double"), "unknown long task 'niah_double'"),
    (dict(length=60), "does not fit in 60 tokens"),
    (dict(task="common_words", length=300), "does not fit in 300 tokens"),
    (dict(haystack="Too short. Far too short."), "the haystack has"),
    (dict(count=0), "at least one prompt"),
])
def test_bad_input_is_refused_in_one_line(tokenizer, haystack, bad, message):
    arguments = dict(tokenizer=tokenizer, haystack=haystack, task="niah_multikey", length=LENGTH, count=2, seed=0) | bad
    with pytest.raises(HeadlabError, match=re.escape(message)) as error:
        task_prompts(**arguments)
    assert "\n" not in str(error.value)


def test_the_word_lists_hold_no_word_twice_and_none_of_the_questions():
    assert len(set(WORDS)) == len(WORDS) > 500
    wording = " ".join(QUESTIONS.values()) + " Below is a numbered list of words; some appear more often than others."
    assert not set(WORDS) & set(re.findall(r"[a-z]+", wording.lower()))
