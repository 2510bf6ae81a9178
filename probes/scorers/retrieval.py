"""Retrieval heads (Wu et al.): needle-in-a-haystack with the copy-paste rule (docs/methods/retrieval.md).

At each greedy decode step the row that produces token ``w`` is recorded for every head (one
``[heads, keys]`` row per layer: cheap even at long context); a head copies when its most
attended key lies in the needle's answer span and holds ``w``. Prefill of ``prompt[:-1]`` runs
through SDPA with no taps, so long contexts cost one ordinary forward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...core.errors import HeadlabError
from ...core.text import load_text
from ...surgeon import Taps, attach, model_shape
from ...surgeon.kv_cache import SharedRooms, cropped_cache, full_attention_only
from ...surgeon.plan import Plan
from ...surgeon.stopping import run_for_taps
from .needles import NEEDLES, Needle
from .settings import NeedleSettings


@dataclass
class NeedlePrompt:
    input_ids: torch.Tensor  # [1, seq]
    answer_positions: list[int]  # token positions of the answer inside the needle
    needle: Needle
    length: int
    depth: float
    question_start: int | None = None  # first token after the context (the question and the wording that asks it)


@dataclass
class RetrievalResult:
    """Per-head retrieval scores ``[layer, head]`` (mean over recalled samples; NaN when no sample
    was recalled) and one record per run (needle, length, depth, response, ROUGE-1 recall)."""

    scores: torch.Tensor
    runs: list[dict] = field(default_factory=list)

    @property
    def recall(self) -> float:
        """Fraction of runs whose response recalled the answer."""
        return sum(r["recalled"] for r in self.runs) / max(1, len(self.runs))


PROMPT_WORDINGS = {
    # SmolLM2-135M-Instruct answers 20 of 36 held-out prompts in this wording, 11 in the harness's
    "headlab": "{context}\n\nBased on the content of the text above, answer the question.\nQuestion: {question}\nAnswer:",
    "harness": "<book>{context}</book>\nBased on the content of the book, Question: {question}\nAnswer:",
}


def chat_prompt(tokenizer, context: str, question: str, style: str = "headlab") -> str:
    """The NIAH prompt text in the wording ``style`` (:data:`PROMPT_WORDINGS`; ``harness`` is the
    retrieval-head harness's), through the chat template where the tokenizer has one (a base model
    gets the plain text)."""
    user = PROMPT_WORDINGS[style].format(context=context, question=question)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return user


def has_chat_template(tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, prompt_text: str, **kwargs):
    """Token ids of a whole prompt: a chat template already holds its special tokens; plain text
    gets the tokenizer's own (a base model's BOS)."""
    return tokenizer(prompt_text, add_special_tokens=not has_chat_template(tokenizer), **kwargs)


def build_prompt(tokenizer, haystack: str, needle: Needle, length: int, depth: float,
                 style: str = "headlab") -> NeedlePrompt:
    """A prompt of ``length`` tokens: haystack text with the needle inserted at the sentence end
    preceding ``depth`` of the context (at its very end for depth 1), then the question. The answer span is found through the
    tokenizer's character offsets (tokens overlapping the answer inside the needle)."""
    return _prompt_from_ids(tokenizer, _haystack_ids(tokenizer, haystack), needle, length, depth, style)


def _haystack_ids(tokenizer, haystack: str) -> list[int]:
    return tokenizer(haystack, add_special_tokens=False).input_ids


def _prompt_from_ids(tokenizer, hay_ids: list[int], needle: Needle, length: int, depth: float,
                     style: str) -> NeedlePrompt:
    """:func:`build_prompt` over a haystack already tokenised (``hay_ids``)."""
    overhead = len(_encode(tokenizer, chat_prompt(tokenizer, needle.sentence, needle.question, style)).input_ids)
    budget = length - overhead - 1
    if budget < 16:
        raise HeadlabError(f"needle length {length} leaves no room for a haystack (needle and question take "
                           f"{overhead} tokens)")
    if len(hay_ids) < budget:
        raise HeadlabError(f"the needle haystack has {len(hay_ids)} tokens, fewer than the {budget} needed for needle "
                           f"length {length} (give a longer haystack text or shorter needle lengths)")
    for _ in range(4):  # re-tokenising joined text shifts the count a little; trim until it fits
        hay = tokenizer.decode(hay_ids[:budget])
        cut = len(hay) if depth >= 1 else _sentence_end(hay, int(depth * len(hay)))
        context = f"{hay[:cut]} {needle.sentence} {hay[cut:]}".strip()
        text = chat_prompt(tokenizer, context, needle.question, style)
        encoded = _encode(tokenizer, text, return_offsets_mapping=True)
        excess = len(encoded.input_ids) - length
        if excess <= 0:
            break
        budget -= excess
    start = text.index(needle.sentence) + needle.sentence.index(needle.answer)
    stop = start + len(needle.answer)
    positions = [i for i, (a, b) in enumerate(encoded.offset_mapping) if a < stop and b > start]
    context_end = text.index(context) + len(context)
    question_start = next(i for i, (a, b) in enumerate(encoded.offset_mapping) if b > context_end)
    ids = torch.tensor([encoded.input_ids])
    return NeedlePrompt(ids, positions, needle, ids.shape[1], depth, question_start)


def _sentence_end(text: str, position: int) -> int:
    """The index just after the last sentence end (``. ``/newline) before ``position`` (0 if none)."""
    ends = [m.end() for m in re.finditer(r"[.!?]\s|\n\n", text[:position])]
    return ends[-1] if ends else 0


def rouge1_recall(response: str, answer: str) -> float:
    """ROUGE-1 recall of ``answer`` in ``response`` as the retrieval-head harness scores it
    (``rouge_score`` with the Porter stemmer)."""
    return _rouge_scorer().score(answer, response)["rouge1"].recall


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


StopRule = Callable[[list[int]], bool]
Status = Callable[[str], None]  # shows what a long step is doing (a progress bar's postfix)


def stop_rule(tokenizer) -> StopRule:
    """When greedy decoding of an answer stops: at an end-of-text (or end-of-turn) token; without a
    chat template (a base model continues the document) also at a newline once the response holds
    some text, so a response that opens with a newline goes on."""
    ends = {i for i in (getattr(tokenizer, "eos_token_id", None),) if i is not None}
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ends.update(i for t, i in vocab.items() if t in ("<|im_end|>", "<|endoftext|>", "</s>", "<end_of_turn>", "<eos>"))
    newlines = set() if has_chat_template(tokenizer) else {
        tokenizer(text, add_special_tokens=False).input_ids[-1] for text in ("\n", "\n\n")}

    def stop(generated: list[int]) -> bool:
        last = generated[-1]
        if last in ends:
            return True
        return last in newlines and bool(tokenizer.decode(generated, skip_special_tokens=True).strip())

    return stop


def answer_stop(tokenizer, stop: StopRule, answer: str) -> StopRule:
    """``stop``, and a stop once the whole ``answer`` is in the response's completed words (those
    later tokens cannot change): ROUGE-1 recall cannot fall as the response grows, so the measures
    are those of the full decoding (the response ends at the answer)."""
    def stopped(generated: list[int]) -> bool:
        if stop(generated):
            return True
        text = tokenizer.decode(generated, skip_special_tokens=True)
        return rouge1_recall(re.sub(r"[A-Za-z0-9]+$", "", text), answer) >= 1
    return stopped


@torch.no_grad()
def greedy_from_cache(model, cache, token: torch.Tensor, max_new_tokens: int, stop: StopRule | None,
                      after_step: Callable[[], None] | None = None, status: Status | None = None) -> list[int]:
    """Greedy decoding from ``token [1, 1]`` on ``cache`` (which it extends); ``after_step`` runs
    after each step's forward (while that step's recording is current); ``status`` hears each step."""
    return _greedy_rows(model, cache, token, [cache.get_seq_length()], max_new_tokens, stop,
                        None if after_step is None else lambda rows: after_step(), status)[0]


@dataclass
class SharedPrefix:
    """The cache of the first ``length`` tokens (``ids [length]``) that several prompts share, computed once."""

    length: int
    cache: object
    ids: torch.Tensor


@torch.no_grad()
def shared_prefix(model, prompts: list[NeedlePrompt], previous: SharedPrefix | None = None,
                  status: Status | None = None) -> SharedPrefix | None:
    """The cache of the longest token prefix every prompt of ``prompts`` shares (leaving each at least
    one prefill token of its own), or None when they share nothing worth a forward. Where the model's
    cache holds whole sequences, the tokens it shares with ``previous`` (an earlier group's prefix:
    the needle grid's haystacks all open alike) are taken from that cache, not computed again.
    ``status`` hears each prefill chunk."""
    ids = [prompt.input_ids[0] for prompt in prompts]
    limit = min(len(i) for i in ids) - 2
    length = 0
    while length < limit and all(i[length] == ids[0][length] for i in ids[1:]):
        length += 1
    if len(prompts) < 2 or length < 2:
        return None
    reused = 0 if previous is None or not full_attention_only(model) else _common_length(previous.ids, ids[0][:length])
    cache = cropped_cache(previous.cache, reused) if reused else None
    if reused < length:
        cache = _continue_cache(model, ids[0][None], reused, length, cache, status)
    return SharedPrefix(length, cache, ids[0][:length])


def _common_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens ``a`` and ``b`` (``[n]`` each) share."""
    n = min(len(a), len(b))
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if len(differs) else n


# A prefill continuing a cache runs under a mask, and a masked SDPA call on the CPU computes every key
# block of every row (a causal one stops at the diagonal): continuing in chunks of rows skips the
# blocks past each chunk (SmolLM2, 3,072 rows after 1,024 cached: 5.7 s instead of 7.2 s, same cache).
CONTINUATION_ROWS = 1024


@torch.no_grad()
def greedy_with_top_keys(model, input_ids: torch.Tensor, max_new_tokens: int, stop: StopRule | None,
                         plan: Plan | None = None, record: bool = True,
                         prefix: SharedPrefix | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding from ``input_ids [1, seq]`` (prefill of all but the last token, then one
    token per step, as the harness decodes); returns the generated ids and, per generated token,
    the most attended key of every head ``[layer, head]`` on the row that produced it. ``prefix``
    (unedited models only: a plan's state could depend on the whole prefill) holds the cache of the
    prompt's first tokens; the prefill then continues from it."""
    return greedy_rows_with_top_keys(model, [input_ids], max_new_tokens, stop, plan, record, prefix)[0]


@torch.no_grad()
def greedy_rows_with_top_keys(model, prompts: list[torch.Tensor], max_new_tokens: int, stop: StopRule | None,
                              plan: Plan | None = None, record: bool = True, prefix: SharedPrefix | None = None,
                              status: Status | None = None) -> list[tuple[list[int], list[torch.Tensor]]]:
    """:func:`greedy_with_top_keys` of each of ``prompts`` (``[1, seq_i]``), decoded side by side:
    each is prefilled alone into its row of one cache (:class:`~headlab.surgeon.kv_cache.SharedRooms`), then each step runs
    every row at once (the weights are read once for all), a mask hiding the positions a shorter
    prompt leaves empty. Several prompts need the unedited model (edits follow sequence positions,
    which the rows do not share) and full-attention caches. ``status`` hears each prefill chunk and
    decode step."""
    edited = plan is not None and bool(plan.edits)
    if edited and (prefix is not None or len(prompts) > 1):
        raise ValueError("a shared prefix and side-by-side decoding are only for the unedited model")
    lengths = [ids.shape[1] - 1 for ids in prompts]  # positions each row prefills
    shape = model_shape(model)
    held, n_layers = max(lengths), shape.n_layers
    rooms = SharedRooms(model, len(prompts), held + max_new_tokens + 1)
    top_keys: list[list[torch.Tensor]] = [[] for _ in prompts]
    with attach(model, plan) as session:
        caches = [_prefill_row(model, session, rooms, row, ids, prefix, status) for row, ids in enumerate(prompts)]
        session.resume(held)
        if record:
            session.set_taps(Taps.all_attention(shape))  # from here on one row per head and step

        def note_top_keys(rows: list[int]) -> None:
            recording = session.recording
            for row in rows:
                top_keys[row].append(_top_key_positions(recording, n_layers, row, held, lengths[row]))
            recording.clear()

        generated = _greedy_rows(model, caches[0] if len(prompts) == 1 else rooms.batch_cache(held),
                                 torch.cat([ids[:, -1:] for ids in prompts]), lengths, max_new_tokens, stop,
                                 note_top_keys if record else None, status)
    return list(zip(generated, top_keys))


def _prefill_row(model, session, rooms: SharedRooms, row: int, ids: torch.Tensor, prefix: SharedPrefix | None,
                 status: Status | None = None):
    """Prefill ``ids [1, n]`` but its last token into row ``row`` of ``rooms`` (the plan applies,
    nothing is recorded), continuing ``prefix`` in chunks of :data:`CONTINUATION_ROWS`; its cache."""
    cache = rooms.row_cache(row, None if prefix is None else prefix.cache)
    if prefix is not None:
        session.resume(prefix.length)
    return _continue_cache(model, ids, 0 if prefix is None else prefix.length, ids.shape[1] - 1, cache, status)


def _continue_cache(model, ids: torch.Tensor, start: int, stop: int, cache, status: Status | None = None):
    """Run ``ids[:, start:stop]`` (``ids [1, seq]``) on ``cache``, which holds the first ``start``
    positions (None: a new cache), in one forward from the start and else in chunks of
    :data:`CONTINUATION_ROWS`; returns the cache."""
    step = stop if start == 0 else CONTINUATION_ROWS
    for first in range(start, stop, step):
        if status is not None:
            status(f"prefill of tokens {first:,}-{min(first + step, stop):,}")
        cache = run_for_taps(model, input_ids=ids[:, first:min(first + step, stop)], past_key_values=cache,
                             use_cache=True).past_key_values
    return cache


def _top_key_positions(recording, n_layers: int, row: int, held: int, length: int) -> torch.Tensor:
    """``[layer, head]`` sequence position of each head's most attended key on ``row``'s decode row:
    a key at slot ``s`` of the shared cache is position ``s`` within the row's ``length`` prefilled
    positions, and ``length + s - held`` among the decoded ones (sliding-window layers hand over
    their last keys only: slots count from ``attention_key_start``)."""
    slots = torch.stack([recording.attention_map(layer, -1)[row, :, -1].argmax(-1)
                         + recording.attention_key_start[layer][-1] for layer in range(n_layers)])
    return torch.where(slots < held, slots, slots - held + length)


def _greedy_rows(model, cache, tokens: torch.Tensor, lengths: list[int], max_new_tokens: int,
                 stop: StopRule | None, after_step: Callable[[list[int]], None] | None,
                 status: Status | None = None) -> list[list[int]]:
    """Greedy decoding of ``tokens [rows, 1]`` on ``cache``, whose slots ``[0, max(lengths))`` hold
    each row's ``lengths[row]`` prefilled positions; ``after_step(running rows)`` runs after each
    step's forward. A row stops at ``stop``; the others go on."""
    held, batch = max(lengths), len(lengths)
    filled = torch.zeros(batch, held + max_new_tokens, dtype=torch.long)
    for row, length in enumerate(lengths):
        filled[row, :length] = 1
    positions = torch.tensor(lengths)[:, None]
    generated: list[list[int]] = [[] for _ in lengths]
    running = list(range(batch))
    for step in range(max_new_tokens):
        if status is not None:
            prompts = f" {len(running)} of {batch} prompts," if batch > 1 else ""
            status(f"decoding{prompts} token {step + 1} of at most {max_new_tokens}")
        filled[:, held + step] = 1
        side_by_side = {} if batch == 1 else {"attention_mask": filled[:, :held + step + 1],
                                               "position_ids": positions + step}
        out = model(input_ids=tokens, past_key_values=cache, use_cache=True, **side_by_side)
        cache = out.past_key_values
        next_ids = out.logits[:, -1].argmax(-1)
        if after_step is not None:
            after_step(running)
        for row in running:
            generated[row].append(int(next_ids[row]))
        running = [row for row in running if stop is None or not stop(generated[row])]
        if not running:
            break
        tokens = next_ids[:, None]
    return generated


def copy_scores(prompt: NeedlePrompt, generated: list[int], top_keys: list[torch.Tensor], mode: str) -> torch.Tensor:
    """``[layer, head]`` copy-paste score of one run: per generated token ``w`` and
    head, a copy when the head's top key is in the answer span and holds ``w``; ``"count"`` adds
    1/|span| per copy, ``"set"`` counts distinct copied positions."""
    span = torch.zeros(prompt.input_ids.shape[1] + len(generated), dtype=torch.bool)
    span[prompt.answer_positions] = True
    ids = torch.cat([prompt.input_ids[0], torch.tensor(generated, dtype=torch.long)])
    copied: dict[tuple[int, int], list[int]] = {}
    for token, keys in zip(generated, top_keys):  # keys [layer, head]
        hits = span[keys] & (ids[keys] == token)
        for layer, head in hits.nonzero().tolist():
            copied.setdefault((layer, head), []).append(int(keys[layer, head]))
    scores = torch.zeros(top_keys[0].shape if top_keys else (0, 0))
    for (layer, head), keys in copied.items():
        scores[layer, head] = len(keys) if mode == "count" else len(set(keys))
    return scores / max(1, len(prompt.answer_positions))


def needle_prompts(tokenizer, settings: NeedleSettings) -> list[NeedlePrompt]:
    """Every (needle, length, depth) prompt of the scoring grid."""
    return needle_grid(tokenizer, load_text(settings.text_path), NEEDLES[:settings.n_needles], settings.lengths,
                       settings.depths, settings.prompt_style)


def needle_grid(tokenizer, haystack: str, needles, lengths, depths, style: str = "headlab") -> list[NeedlePrompt]:
    """A prompt for every needle at every length and depth, over ``haystack``, in wording ``style``
    (the haystack is tokenised once)."""
    hay_ids = _haystack_ids(tokenizer, haystack)
    return [_prompt_from_ids(tokenizer, hay_ids, needle, length, depth, style)
            for needle in needles for length in lengths for depth in depths]


def retrieval_scores(model, tokenizer, settings: NeedleSettings | None = None, plan: Plan | None = None,
                     progress: bool = True, record: bool = True) -> RetrievalResult:
    """Run the NIAH grid; return retrieval scores (``record=False``: recall only, scores NaN)."""
    settings = settings or NeedleSettings()
    shape = model_shape(model)
    stop = stop_rule(tokenizer)
    total = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.float64)
    accepted, runs = 0, {}
    prompts = needle_prompts(tokenizer, settings)
    bar = tqdm(total=len(prompts), desc="needle in a haystack", unit="run", disable=not progress)
    unedited = plan is None or not plan.edits
    latest = None  # the last prefix computed: the next group's haystack opens alike
    for group in _prefix_groups(prompts):  # the needles at one length and depth share the text before them
        prefix = shared_prefix(model, [prompts[i] for i in group], latest, bar.set_postfix_str) if unedited else None
        latest = prefix or latest
        for rows in _decode_batches(model, [prompts[i] for i in group], settings.max_new_tokens, unedited):
            decoded = greedy_rows_with_top_keys(model, [prompts[group[i]].input_ids for i in rows],
                                                settings.max_new_tokens, stop, plan, record, prefix,
                                                bar.set_postfix_str)
            for row, (generated, top_keys) in zip(rows, decoded):
                index = group[row]
                prompt = prompts[index]
                response = tokenizer.decode(generated, skip_special_tokens=True)
                recall = rouge1_recall(response, prompt.needle.answer)
                recalled = recall > settings.rouge_min
                if recalled and record:
                    total += copy_scores(prompt, generated, top_keys, settings.mode).double()
                    accepted += 1
                runs[index] = {"needle": NEEDLES.index(prompt.needle), "length": prompt.length,
                               "depth": prompt.depth, "response": response.strip(),
                               "rouge1_recall": round(recall, 4), "recalled": recalled}
                bar.update()
    bar.close()
    scores = (total / accepted).float() if accepted else torch.full(total.shape, math.nan)
    return RetrievalResult(scores, [runs[i] for i in range(len(prompts))])


DECODE_BATCH_BYTES = 2 * 2**30  # the most cache bytes of prompts decoded side by side


def _decode_batches(model, prompts: list[NeedlePrompt], max_new_tokens: int, unedited: bool) -> list[list[int]]:
    """Indices of ``prompts`` in the batches they decode in: side by side as many as fit
    :data:`DECODE_BATCH_BYTES` of cache (unedited models with full-attention caches), else one by one."""
    if not unedited or not full_attention_only(model):
        return [[i] for i in range(len(prompts))]
    shape = model_shape(model)
    element = next(model.parameters()).element_size()
    positions = max(prompt.length for prompt in prompts) + max_new_tokens
    row_bytes = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * element * positions
    size = max(1, DECODE_BATCH_BYTES // row_bytes)
    return [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]


def _prefix_groups(prompts: list[NeedlePrompt]) -> list[list[int]]:
    """Indices of ``prompts`` grouped by depth and length (to 64 tokens), in first-seen order: the
    needles of one group share the text before them."""
    groups: dict[tuple, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault((prompt.depth, prompt.length // 64), []).append(index)
    return list(groups.values())


__all__ = ["NEEDLES", "Needle", "NeedlePrompt", "NeedleSettings", "RetrievalResult", "build_prompt", "copy_scores",
           "PROMPT_WORDINGS", "SharedPrefix", "greedy_from_cache", "greedy_rows_with_top_keys", "greedy_with_top_keys", "needle_grid", "needle_prompts", "retrieval_scores", "rouge1_recall", "shared_prefix",
           "stop_rule"]
