"""RULER-style long-context tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), built offline and scored by exact string match.

Each task hides items in a long context and asks for them: magic numbers for word keys in the
haystack text (one fact; four facts of which one is asked; four values of one key), a chain of
variable assignments spread over the haystack, or a numbered list of words in which ten words come
far more often than the rest. A prompt is fitted to a length in tokens as the needle prompts are
(:mod:`.retrieval`: the haystack is trimmed until the whole prompt fits, facts go at sentence ends)
and worded through the same chat-template machinery. A response scores the fraction of the answers
it contains (RULER's ``string_match_all``). Keys, numbers and words are drawn from the word lists of
:mod:`.words` with ``random.Random(seed)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from ...core.errors import HeadlabError
from .retrieval import PROMPT_WORDINGS, _encode, _haystack_ids, _sentence_end, chat_prompt
from .words import ADJECTIVES, NOUNS, WORDS


@dataclass
class TaskPrompt:
    """One prompt of a long task: ``input_ids [1, seq]`` (``length`` tokens), the index of the
    first token after the context (``question_start``: the question and the wording that asks it
    begin there), the answers a response must hold, and where the task's first item sits in the
    context (``depth``, a fraction; None for a task without one place)."""

    input_ids: torch.Tensor  # [1, seq]
    question_start: int
    answers: tuple[str, ...]
    task: str
    length: int
    depth: float | None

    def score(self, response: str) -> float:
        """RULER's ``string_match_all``: the fraction of ``answers`` found in ``response``,
        ignoring case."""
        found = response.lower()
        return sum(answer.lower() in found for answer in self.answers) / len(self.answers)


@dataclass
class _Request:
    """What every prompt of one :func:`task_prompts` call shares (the haystack is tokenised once,
    and only for the tasks that read it)."""

    tokenizer: object
    haystack: str
    length: int
    style: str

    @cached_property
    def hay_ids(self) -> list[int]:
        return _haystack_ids(self.tokenizer, self.haystack)


Builder = Callable[[_Request, random.Random, "float | None"], TaskPrompt]


@dataclass(frozen=True)
class LongTask:
    """A task of :data:`LONG_TASKS`: its name, what it asks, how many tokens a response may take,
    whether its prompts have a depth, and the function that builds one prompt."""

    name: str
    description: str
    max_new_tokens: int
    builder: Builder
    has_depth: bool = True


# ---------------------------------------------------------------------------------------------------
# Drawing keys, values and names

MAGIC_FACT = "The special magic number for {key} is: {value}."
MAGIC_VALUE = "One of the special magic numbers for {key} is: {value}."  # one key, several values
ITEMS = 4  # facts of niah_multikey, values of niah_multivalue
CHAIN = 5  # variables of variable_tracking's one chain
COMMON = 10  # the most common words of common_words


def _keys(rng: random.Random, n: int) -> list[str]:
    """``n`` keys ``adjective-noun``, no adjective or noun twice."""
    return [f"{adjective}-{noun}" for adjective, noun in zip(rng.sample(ADJECTIVES, n), rng.sample(NOUNS, n))]


def _numbers(rng: random.Random, n: int, digits: int, haystack: str) -> list[str]:
    """``n`` different numbers of ``digits`` digits, none of them found in ``haystack``."""
    found: list[str] = []
    while len(found) < n:
        number = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if number not in found and number not in haystack:
            found.append(number)
    return found


def _names(rng: random.Random, n: int, haystack: str) -> list[str]:
    """``n`` different variable names (nouns in capitals), none of them found in ``haystack``."""
    names = [noun.upper() for noun in rng.sample(NOUNS, len(NOUNS))]
    return [name for name in names if name not in haystack][:n]


def _other_depths(rng: random.Random, depth: float, n: int) -> list[float]:
    """``n`` depths for distractor items: different tenths of the context, none the tenth of ``depth``."""
    slots = [0.05 + 0.1 * i for i in range(10)]
    slots.remove(min(slots, key=lambda slot: abs(slot - depth)))
    return rng.sample(slots, n)


# ---------------------------------------------------------------------------------------------------
# The builders


def _niah_single(request: _Request, rng: random.Random, depth: float) -> TaskPrompt:
    """One magic-number fact at ``depth``; the question asks for it."""
    key, value = _keys(rng, 1)[0], _numbers(rng, 1, 7, request.haystack)[0]
    question = f"What is the special magic number for {key} mentioned in the text?"
    return _haystack_prompt(request, "niah_single", [(depth, MAGIC_FACT.format(key=key, value=value))],
                            question, (value,), depth)


def _niah_multikey(request: _Request, rng: random.Random, depth: float) -> TaskPrompt:
    """:data:`ITEMS` facts of different keys; the one at ``depth`` is asked for, the others distract."""
    keys, values = _keys(rng, ITEMS), _numbers(rng, ITEMS, 7, request.haystack)
    depths = [depth] + _other_depths(rng, depth, ITEMS - 1)
    facts = [(at, MAGIC_FACT.format(key=key, value=value)) for at, key, value in zip(depths, keys, values)]
    question = f"What is the special magic number for {keys[0]} mentioned in the text?"
    return _haystack_prompt(request, "niah_multikey", facts, question, (values[0],), depth)


def _niah_multivalue(request: _Request, rng: random.Random, depth: float) -> TaskPrompt:
    """:data:`ITEMS` values of one key, the first at ``depth``; the question asks for all of them."""
    key, values = _keys(rng, 1)[0], _numbers(rng, ITEMS, 7, request.haystack)
    depths = [depth] + _other_depths(rng, depth, ITEMS - 1)
    facts = [(at, MAGIC_VALUE.format(key=key, value=value)) for at, value in zip(depths, values)]
    question = f"What are all the special magic numbers for {key} mentioned in the text?"
    return _haystack_prompt(request, "niah_multivalue", facts, question, tuple(values), depth)


def _variable_tracking(request: _Request, rng: random.Random, depth: float) -> TaskPrompt:
    """A chain ``VAR A = value``, ``VAR B = VAR A``, ... of :data:`CHAIN` variables, in order: the
    first statement at ``depth``, the others at random places after it; the question asks which
    variables hold the value (all of them)."""
    names, value = _names(rng, CHAIN, request.haystack), _numbers(rng, 1, 5, request.haystack)[0]
    depths = [depth] + sorted(rng.uniform(depth, 1.0) for _ in range(CHAIN - 1))
    sources = [value] + [f"VAR {name}" for name in names[:-1]]
    statements = [(at, f"VAR {name} = {source}.") for at, name, source in zip(depths, names, sources)]
    question = f"Which variables are assigned the value {value}, directly or through other variables, in the text?"
    return _haystack_prompt(request, "variable_tracking", statements, question, tuple(names), depth)


def _common_words(request: _Request, rng: random.Random, depth: None) -> TaskPrompt:
    """A numbered list filling the length: :data:`COMMON` words many times each, the others few
    times (RULER's counts: 30 and 3 from 4,096 tokens, 6 and 1 below; the rare words repeat more
    where the word list is too short to fill the length, and the last one may come fewer times, so
    the list fills the length to a few tokens); the question asks for the common words."""
    common_repeats, rare_repeats = (30, 3) if request.length >= 4096 else (6, 1)
    order = rng.sample(WORDS, len(WORDS))
    common, rare = order[:COMMON], order[COMMON:]
    shuffle_seed = rng.getrandbits(32)
    question = f"What are the {COMMON} most common words in the numbered list above?"

    def build(repeats: int, n_rare: int):
        """The prompt with the first ``n_rare`` entries of the rare words, each ``repeats`` times."""
        words = common * common_repeats + [word for word in rare for _ in range(repeats)][:n_rare]
        random.Random(shuffle_seed).shuffle(words)
        listed = " ".join(f"{number}. {word}" for number, word in enumerate(words, 1))
        return _encoded_prompt(request, f"Below is a numbered list of words; some appear more often than others.\n"
                                        f"{listed}", question)

    for repeats in range(rare_repeats, common_repeats // 3 + 1):
        most = len(rare) * repeats
        n_rare = _most_that_fit(lambda n: len(build(repeats, n)[2].input_ids), most, request.length, "common_words")
        if n_rare < most:
            break
    else:
        raise HeadlabError(f"common_words at length {request.length}: the word list ({len(WORDS)} words) is too "
                           f"short to fill it with rare words repeated at most {common_repeats // 3} times")
    return _task_prompt("common_words", *build(repeats, n_rare), tuple(common), None)


def _most_that_fit(tokens: Callable[[int], int], most: int, length: int, task: str) -> int:
    """The largest ``n`` in ``[0, most]`` whose prompt (``tokens(n)`` long, growing with ``n``)
    fits ``length`` tokens."""
    if tokens(0) > length:
        raise HeadlabError(f"{task} does not fit in {length} tokens: its shortest prompt takes {tokens(0)}")
    if tokens(most) <= length:
        return most
    low, high = 0, most - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if tokens(middle) <= length else (low, middle - 1)
    return low


# ---------------------------------------------------------------------------------------------------
# Fitting a prompt to its length


def _haystack_prompt(request: _Request, task: str, items: list[tuple[float, str]], question: str,
                     answers: tuple[str, ...], depth: float) -> TaskPrompt:
    """A prompt of at most ``request.length`` tokens: the haystack with each ``(depth, sentence)``
    of ``items`` inserted at the sentence end before that depth (in list order where two meet),
    then the question; the haystack is trimmed until the prompt fits (as the needle prompts are)."""
    tokenizer, length = request.tokenizer, request.length
    overhead = len(_encode(tokenizer, chat_prompt(tokenizer, " ".join(s for _, s in items), question,
                                                  request.style)).input_ids)
    budget = length - overhead - 1
    if budget < 16:
        raise HeadlabError(f"{task} does not fit in {length} tokens: its facts and question take {overhead}, "
                           "leaving no room for a haystack")
    if len(request.hay_ids) < budget:
        raise HeadlabError(f"the haystack has {len(request.hay_ids)} tokens, fewer than the {budget} {task} needs at "
                           f"length {length} (give a longer haystack text or a shorter length)")
    while True:  # re-tokenising joined text shifts the count a little; trim until it fits
        context = _insert(tokenizer.decode(request.hay_ids[:budget]), items)
        _, text, encoded = _encoded_prompt(request, context, question)
        excess = len(encoded.input_ids) - length
        if excess <= 0:
            return _task_prompt(task, context, text, encoded, answers, depth)
        budget -= excess


def _insert(hay: str, items: list[tuple[float, str]]) -> str:
    """``hay`` with each ``(depth, sentence)`` inserted at the sentence end before ``depth`` of it
    (at its very end for depth 1)."""
    cuts = [(len(hay) if at >= 1 else _sentence_end(hay, int(at * len(hay))), order, sentence)
            for order, (at, sentence) in enumerate(items)]
    pieces, done = [], 0
    for cut, _, sentence in sorted(cuts):
        pieces += [hay[done:cut], f" {sentence} "]
        done = cut
    return ("".join(pieces) + hay[done:]).strip()


def _encoded_prompt(request: _Request, context: str, question: str):
    """``(context, text, encoding with offsets)`` of the whole prompt around ``context``."""
    text = chat_prompt(request.tokenizer, context, question, request.style)
    return context, text, _encode(request.tokenizer, text, return_offsets_mapping=True)


def _task_prompt(task: str, context: str, text: str, encoded, answers: tuple[str, ...],
                 depth: float | None) -> TaskPrompt:
    """The :class:`TaskPrompt` of an encoded prompt; the question starts at the first token that
    ends past the context."""
    context_end = text.index(context) + len(context)
    question_start = next(i for i, (_, stop) in enumerate(encoded.offset_mapping) if stop > context_end)
    ids = torch.tensor([encoded.input_ids])
    return TaskPrompt(ids, question_start, answers, task, ids.shape[1], depth)


# ---------------------------------------------------------------------------------------------------
# The registry

LONG_TASKS: dict[str, LongTask] = {task.name: task for task in (
    LongTask("niah_single", "one magic number hidden in the haystack; answer it", 32, _niah_single),
    LongTask("niah_multikey", f"{ITEMS} magic numbers of different keys; answer the one asked for", 32,
             _niah_multikey),
    LongTask("niah_multivalue", f"{ITEMS} magic numbers of one key; answer all of them", 64, _niah_multivalue),
    LongTask("variable_tracking", f"a chain of {CHAIN} variable assignments; name every variable holding the value",
             48, _variable_tracking),
    LongTask("common_words", f"a numbered word list; name its {COMMON} most common words", 120, _common_words,
             has_depth=False),
)}


def task_prompts(tokenizer, haystack: str, task: str, length: int, count: int, seed: int,
                 style: str = "headlab") -> list[TaskPrompt]:
    """``count`` prompts of :data:`LONG_TASKS` ``task``, each of at most ``length`` tokens (within a
    few), over ``haystack`` text (unused by ``common_words``), in wording ``style``
    (:data:`~headlab.probes.scorers.retrieval.PROMPT_WORDINGS`); the same for the same ``seed``.
    A task with a depth has its prompts' depths spread evenly over 0.1..0.9."""
    if task not in LONG_TASKS:
        raise HeadlabError(f"unknown long task {task!r} (the tasks: {', '.join(LONG_TASKS)})")
    if count < 1:
        raise HeadlabError(f"count {count}: need at least one prompt")
    if style not in PROMPT_WORDINGS:
        raise HeadlabError(f"unknown prompt style {style!r} (the styles: {', '.join(PROMPT_WORDINGS)})")
    entry, rng = LONG_TASKS[task], random.Random(seed)
    request = _Request(tokenizer, haystack, length, style)
    depths = [0.1 + 0.8 * i / (count - 1) for i in range(count)] if count > 1 else [0.5]
    return [entry.builder(request, rng, depth if entry.has_depth else None) for depth in depths]


__all__ = ["LONG_TASKS", "LongTask", "TaskPrompt", "task_prompts"]
