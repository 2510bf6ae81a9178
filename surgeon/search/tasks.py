"""Multiple-choice tasks: a JSONL format and built-in generators that need no download.

One example per JSONL line: ``{"prompt": str, "choices": [str, ...], "label": int}``, optionally
``"demonstrations": [{"prompt": str, "answer": str}, ...]`` (few-shot, prepended to the prompt).
Choices are scored as continuations of the prompt, so they usually start with a space.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import InputFileError
from ...core.files import read_jsonl
from ...core.kinds import Integer, Items, Kind, Maybe, Text
from ...core.settings import check_object, check_settings, setting

SPLITS = ("calibration", "test")


@dataclass(frozen=True)
class Example:
    """One multiple-choice item; ``label`` indexes ``choices``."""

    prompt: str
    choices: tuple[str, ...]
    label: int
    demonstrations: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self):
        if len(self.choices) < 2:
            raise ValueError(f"an example needs at least two choices, got {list(self.choices)}")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} is not an index of {len(self.choices)} choices")

    def context(self) -> str:
        """The demonstrations followed by the prompt."""
        shots = "".join(f"{prompt}{answer}\n\n" for prompt, answer in self.demonstrations)
        return shots + self.prompt


# --- built-in generators: each item is a function of (rng) -------------------------------------

_WORDS = ("apple", "river", "stone", "cloud", "lamp", "tiger", "glass", "paper", "honey", "violin", "candle", "mirror")
_POSITIVE = ("wonderful", "delightful", "excellent", "lovely", "superb", "charming", "brilliant")
_NEGATIVE = ("awful", "dreadful", "terrible", "boring", "horrible", "dull", "disappointing")
_SUBJECTS = ("The film", "The meal", "The concert", "The book", "The hotel", "The game", "The service")


def _kv_recall(rng: random.Random) -> Example:
    """In-context key-value recall: which number was paired with a key."""
    keys = rng.sample(_WORDS, 6)
    values = rng.sample(range(10, 100), 6)
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    target = rng.randrange(6)
    distractors = rng.sample([v for i, v in enumerate(values) if i != target], 3)
    choices = [values[target], *distractors]
    rng.shuffle(choices)
    return Example(f"Pairs: {pairs}.\nThe value of {keys[target]} is", tuple(f" {c}" for c in choices),
                   choices.index(values[target]))


def _review(rng: random.Random, positive: bool) -> str:
    words = _POSITIVE if positive else _NEGATIVE
    first, second = rng.sample(words, 2)
    return f"Review: {rng.choice(_SUBJECTS)} was {first} and {second}.\nSentiment:"


def _label_words(rng: random.Random) -> Example:
    """Sentiment with label words, four demonstrations."""
    demos = []
    for positive in rng.sample([True, True, False, False], 4):
        demos.append((_review(rng, positive), " positive" if positive else " negative"))
    positive = rng.random() < 0.5
    return Example(_review(rng, positive), (" positive", " negative"), 0 if positive else 1, tuple(demos))


def _arithmetic(rng: random.Random) -> Example:
    """Two-digit addition, four numeric choices."""
    a, b = rng.randrange(10, 60), rng.randrange(10, 40)
    answer = a + b
    options = {answer}
    while len(options) < 4:
        options.add(answer + rng.choice((-10, -2, -1, 1, 2, 10)))
    choices = sorted(options)
    return Example(f"Question: {a} + {b} =", tuple(f" {c}" for c in choices), choices.index(answer))


BUILTIN_TASKS = {"kv-recall": _kv_recall, "label-words": _label_words, "arithmetic": _arithmetic}


class TaskName(Kind):
    """A built-in task's name or the path of an existing JSONL task file."""

    metavar = "TASK"

    def check(self, value):
        if isinstance(value, str) and value in BUILTIN_TASKS:
            return value
        if isinstance(value, str) and Path(value).is_file():
            return value
        raise ValueError(f"{value!r} is neither a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) nor a JSONL file")


@dataclass
class TaskSettings:
    """Which multiple-choice tasks to run and how many examples of each."""

    tasks: tuple[str, ...] = setting((), "a built-in task (arithmetic, kv-recall, label-words) or a JSONL file of "
                                         "{prompt, choices, label[, demonstrations]} lines; repeat for several",
                                     kind=Items(TaskName()), flag="--task")
    size: int | None = setting(None, "examples per task (built-in default 100; JSONL: the whole split)",
                               kind=Maybe(Integer(1)), flag="--size")
    seed: int = setting(0, "seed of the generators and of the JSONL shuffle", kind=Integer(0), flag="--seed")
    batch_size: int = setting(16, "sequences per forward", kind=Integer(1), flag="--batch-size")

    def __post_init__(self):
        check_settings(self)
        if not self.tasks:
            raise InputFileError("no task given: name a built-in task or a JSONL file (--task)")

    def examples(self, split: str) -> list[Example]:
        """Every task's examples of ``split``, in order."""
        return [example for task in self.tasks for example in load_task(task, split, self.size, self.seed)]


def load_task(spec: str, split: str, size: int | None = None, seed: int = 0) -> list[Example]:
    """Examples of a built-in task name or a JSONL file.

    Built-in tasks draw ``size`` (default 100) examples from a generator seeded by ``seed`` and
    the split. JSONL files are shuffled with ``seed``; the first half is the calibration split,
    the rest the test split; ``size`` truncates.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec in BUILTIN_TASKS:
        rng = random.Random(f"{spec}/{split}/{seed}")
        return [BUILTIN_TASKS[spec](rng) for _ in range(size or 100)]
    path = Path(spec)
    if not path.is_file():
        raise InputFileError(f"unknown task {spec!r}: not a built-in task {sorted(BUILTIN_TASKS)} nor a JSONL file")
    examples = _read_jsonl(path)
    random.Random(seed).shuffle(examples)
    half = len(examples) // 2
    chosen = examples[:half] if split == "calibration" else examples[half:]
    return chosen[:size] if size else chosen


_DEMONSTRATION = {"prompt": Text(), "answer": Text()}


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    for number, item in read_jsonl(path, "task file"):
        where = f"{path}:{number}"
        line = check_object(item, where, {"prompt": Text(), "choices": Items(Text(), min_items=2), "label": Integer(0)},
                            {"demonstrations": Items(Kind(), unique=False, min_items=0)})
        if line["label"] >= len(line["choices"]):
            raise InputFileError(f"{where}: label {line['label']} is not an index of {len(line['choices'])} choices")
        demos = tuple(check_object(demo, f"{where}: demonstration {i}", _DEMONSTRATION)
                      for i, demo in enumerate(line.get("demonstrations", ())))
        examples.append(Example(line["prompt"], line["choices"], line["label"],
                                tuple((demo["prompt"], demo["answer"]) for demo in demos)))
    if len(examples) < 2:
        raise InputFileError(f"{path} holds {len(examples)} example(s); need at least 2 to split")
    return examples
