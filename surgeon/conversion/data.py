"""Training data of ``headlab convert``: windows of text, or chat conversations built offline.

A chat conversation is a passage of the text (a random stretch of 64 to ``tokens - 128`` tokens)
with a question in the user turn and the original model's own greedy answer (before conversion)
in the assistant turn, formatted by the model's chat template. Half of the questions ask for a
synthetic fact hidden at a random depth of the passage (``The locker code of Marta is silver
violin forty.``), so the converted layers learn from retrieval as well as from summaries; the
rest ask what the passage is about or for a one-sentence summary. Conversations are packed into
``tokens``-token windows (``--tokens``). Training passages come from the training text, held-out ones from the
held-out standard-library docstrings (or the second half of a user's text file). The
conversations are written to ``training/chat_data.json`` (readable, reused when the command is
run again with the same settings).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...core.errors import HeadlabError
from ...core.files import write_json
from ...core.text import load_text, train_eval_windows

CHAT_FORMAT = "headlab-chat-data/1"
MAX_RESPONSE_TOKENS = 64
GENERATION_BATCH = 16
NOUNS = ("password", "locker code", "secret word", "meeting room", "lucky charm", "boat's name")
NAMES = ("Marta", "Idris", "Keiko", "Tomasz", "Amara", "Lars", "Priya", "Jonah")
ADJECTIVES = ("silver", "quiet", "crimson", "frozen", "golden", "hollow")
THINGS = ("lantern", "river", "violin", "falcon", "harbour", "orchid")
NUMBERS = ("seven", "twelve", "forty", "ninety", "three", "sixteen")
OTHER_QUESTIONS = ("What is the text above about?", "Summarise the text above in one sentence.")


def training_windows(model, tokenizer, settings, n_train: int, folder: Path, progress: bool = True):
    """``(train, held_out)`` lists of ``[1, text.tokens]`` id windows of the kind ``settings.data`` names
    (:class:`~headlab.surgeon.conversion.settings.ConversionSettings`)."""
    if settings.data == "text":
        return train_eval_windows(tokenizer, settings.text.text_path, n_train, settings.text.windows, settings.text.tokens,
                                  settings.seed)
    return chat_windows(model, tokenizer, settings, n_train, folder, progress)


def require_chat_template(tokenizer, model_spec: str) -> None:
    """One clear error for ``--data chat`` on a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise HeadlabError(f"{model_spec} has no chat template, so --data chat cannot format conversations; "
                           "use --data text")


def chat_windows(model, tokenizer, settings, n_train: int, folder: Path, progress: bool = True):
    """Conversations packed into ``n_train`` training and ``settings.text.windows`` held-out windows."""
    path = Path(folder) / "chat_data.json"
    key = {"seq_len": settings.text.tokens, "n_train": n_train, "eval_windows": settings.text.windows,
           "text_path": settings.text.text_path, "seed": settings.seed, "max_response_tokens": MAX_RESPONSE_TOKENS}
    data = _read_if_current(path, key)
    if data is None:
        train_text, heldout_text = _texts(settings.text.text_path)
        rng = random.Random(settings.seed)
        data = {"format": CHAT_FORMAT, "settings": key,
                "train": _conversations(model, tokenizer, train_text, n_train, settings.text.tokens, rng, progress),
                "held_out": _conversations(model, tokenizer, heldout_text, settings.text.windows, settings.text.tokens,
                                           rng, progress)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
    return (pack(tokenizer, data["train"], settings.text.tokens, n_train),
            pack(tokenizer, data["held_out"], settings.text.tokens, settings.text.windows))


def _read_if_current(path: Path, key: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(data, dict) and data.get("format") == CHAT_FORMAT and data.get("settings") == key
    return data if ok else None


def _texts(text_path: str | None) -> tuple[str, str]:
    """Training and held-out text: the scoring and held-out docstrings, or a file's two halves."""
    if text_path is None:
        return load_text(None), load_text(None, heldout=True)
    text = load_text(text_path)
    middle = len(text) // 2
    return text[:middle], text[middle:]


def _conversations(model, tokenizer, text: str, n_windows: int, seq_len: int, rng: random.Random,
                   progress: bool) -> list[dict]:
    """Enough conversations to fill ``n_windows`` windows of ``seq_len`` tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    longest = max(16, min(seq_len - 128, len(ids) - 1))
    shortest = min(64, longest)
    conversations, total = [], 0
    needed = n_windows * seq_len
    bar = tqdm(total=needed, desc="chat data", unit="tok", disable=not progress)
    while total < needed:
        batch = [_question(tokenizer, ids, rng, shortest, longest) for _ in range(GENERATION_BATCH)]
        for item, response in zip(batch, _answers(model, tokenizer, [b["prompt"] for b in batch])):
            item["response"] = response
            conversations.append(item)
            length = len(conversation_ids(tokenizer, item))
            total += length
            bar.update(length)
    bar.close()
    return conversations


def _question(tokenizer, ids: list[int], rng: random.Random, shortest: int, longest: int) -> dict:
    """A user turn: a passage and a question (half of them about a fact hidden in the passage)."""
    size = rng.randint(shortest, longest)
    start = rng.randrange(0, len(ids) - size)
    passage = tokenizer.decode(ids[start:start + size]).strip()
    if rng.random() < 0.5:
        return {"kind": "summary", "prompt": f"{passage}\n\n{rng.choice(OTHER_QUESTIONS)}"}
    noun, name = rng.choice(NOUNS), rng.choice(NAMES)
    answer = f"{rng.choice(ADJECTIVES)} {rng.choice(THINGS)} {rng.choice(NUMBERS)}"
    cut = _sentence_end(passage, rng.random())
    text = f"{passage[:cut]} The {noun} of {name} is {answer}. {passage[cut:]}".strip()
    return {"kind": "retrieval", "answer": answer,
            "prompt": f"{text}\n\nBased on the content of the text above, answer the question.\n"
                      f"Question: What is the {noun} of {name}?\nAnswer:"}


def _sentence_end(text: str, fraction: float) -> int:
    """The index after the last sentence end before ``fraction`` of ``text`` (0 if none)."""
    position = int(fraction * len(text))
    ends = [i + 2 for i in range(position - 1) if text[i] in ".!?" and text[i + 1].isspace()]
    return ends[-1] if ends else 0


@torch.no_grad()
def _answers(model, tokenizer, prompts: list[str]) -> list[str]:
    """The model's greedy answers to ``prompts`` (one left-padded batch)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    out = model.generate(**batch, max_new_tokens=MAX_RESPONSE_TOKENS, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return [tokenizer.decode(row[batch.input_ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


def conversation_ids(tokenizer, conversation: dict) -> list[int]:
    """Token ids of one conversation through the chat template."""
    messages = [{"role": "user", "content": conversation["prompt"]},
                {"role": "assistant", "content": conversation["response"]}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def pack(tokenizer, conversations: list[dict], seq_len: int, n_windows: int) -> list[torch.Tensor]:
    """The conversations' ids, concatenated in order and cut into ``n_windows`` windows ``[1, seq_len]``."""
    stream: list[int] = []
    for conversation in conversations:
        stream += conversation_ids(tokenizer, conversation)
        if len(stream) >= n_windows * seq_len:
            break
    if len(stream) < n_windows * seq_len:
        raise HeadlabError(f"the conversations hold {len(stream)} tokens, fewer than {n_windows} windows of {seq_len}")
    return [torch.tensor([stream[i * seq_len:(i + 1) * seq_len]]) for i in range(n_windows)]


__all__ = ["CHAT_FORMAT", "chat_windows", "conversation_ids", "pack", "require_chat_template", "training_windows"]
