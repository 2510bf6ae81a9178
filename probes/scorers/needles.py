"""The needles of the needle-in-a-haystack runs: facts hidden in a haystack, the question that asks
for each, and the answer. Retrieval heads are scored on :data:`NEEDLES`; the masking validation
uses :data:`HELDOUT_NEEDLES` (and a held-out haystack), so heads are never validated on the
prompts they were selected on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Needle:
    """A fact hidden in the haystack, the question that asks for it, and the answer."""

    sentence: str
    question: str
    answer: str


NEEDLES = (
    Needle("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
           "What is the best thing to do in San Francisco?", "eat a sandwich and sit in Dolores Park on a sunny day"),
    Needle("The secret ingredient of the lighthouse keeper's soup is smoked paprika from Szeged.",
           "What is the secret ingredient of the lighthouse keeper's soup?", "smoked paprika from Szeged"),
    Needle("The password for the archive room on the third floor is purple walrus nineteen.",
           "What is the password for the archive room on the third floor?", "purple walrus nineteen"),
)

HELDOUT_NEEDLES = (
    Needle("The reservation code for the harbour ferry on Tuesday is amber falcon forty.",
           "What is the reservation code for the harbour ferry on Tuesday?", "amber falcon forty"),
    Needle("The museum's missing painting was found behind the organ in the old chapel.",
           "Where was the museum's missing painting found?", "behind the organ in the old chapel"),
    Needle("Professor Lindqvist keeps her spare keys inside a hollow copy of Moby Dick.",
           "Where does Professor Lindqvist keep her spare keys?", "inside a hollow copy of Moby Dick"),
    Needle("The winning recipe at the village fair used roasted chestnuts and dark honey.",
           "What did the winning recipe at the village fair use?", "roasted chestnuts and dark honey"),
    Needle("The night train to Trieste leaves from platform eleven at ten past midnight.",
           "From which platform does the night train to Trieste leave?", "platform eleven"),
    Needle("The gardener's favourite tool is a copper trowel she bought in Lisbon.",
           "What is the gardener's favourite tool?", "a copper trowel she bought in Lisbon"),
)

__all__ = ["HELDOUT_NEEDLES", "NEEDLES", "Needle"]
