"""A synthetic story corpus whose entropy is known exactly, for tests and offline demos.

A story is a fixed opening sentence, K middle sentences and an ending sentence, for example:

    Once upon a time, there was a shy fox named Mia. She lived in a cozy cave. Her best friend was a duck
    named Omar. Later, she felt proud because the sky was bright. In the end, Mia and Omar were happy.

Every random decision is an independent draw from a fixed table: the six "cast" values of the opening
(adjective, animal, hero, home, friend's animal, friend), K, the template of each middle sentence and of
the ending, and the "fresh" words inside those templates. Later mentions of the cast ("Mia", "she") are
copies, not draws: they add tokens but no entropy, and a model can only predict them by looking back.

**Entropy per document.** The text determines every draw: each sentence template begins with its own
first word, so the sequence of templates (and K) can be read off; within a template, each slot's values
have the same number of words, so each value sits at a known position. The map from draws to text is thus
one-to-one, and the entropy of a story is exactly the sum of the entropies of its draws (in nats):

    H(doc) = sum over cast slots H(slot) + H(K) + E[K] * H(middle) + H(ending),
    H(middle) = H(template) + sum over templates t of P(t) * sum over fresh slots s in t of H(s).

A tokenizer is a deterministic, invertible map from text to token ids, so the token sequence of a
document carries exactly H(doc) as well, and the end-of-text (and <bos>) tokens around it carry nothing
more: the ending sentence marks the end, and documents are independent.

**Entropy per token.** A language model's validation loss is the mean cross-entropy per token, in nats:
the total loss over the documents divided by their total token count. Its best possible value, reached by
a model that knows the grammar and sees each document from its start, is therefore H(doc) / E[T], where T
is the number of tokens of a document including its framing tokens. E[T] is computed exactly because the
story is cut into pieces (each literal run of words, and each chosen or copied value with the space in
front of it) that the tokenizer never merges across: values are whole words, a space comes before every
word, and punctuation only follows a word. Then T is the sum of the token counts of the pieces, and E[T]
the sum of their expectations. `token_counts_are_additive` checks that assumption for a tokenizer on
sampled stories. (Windows of a packed stream that begin mid-document hide the story's start from the
model, so a trained model's loss can only approach this floor from above.)
"""

from __future__ import annotations

import math
import random
import re
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

GRAMMAR_VERSION = 1  # bump when the grammar changes: it is part of a prepared folder's recipe


@dataclass(frozen=True)
class Slot:
    """A table of alternatives with their probabilities."""

    values: tuple[str, ...]
    probs: tuple[float, ...]

    @classmethod
    def make(cls, words: str, weights: tuple[float, ...] | None = None) -> Slot:
        """Alternatives separated by "|"; uniform unless `weights` are given."""
        values = tuple(words.split("|"))
        w = weights or (1.0,) * len(values)
        if len(w) != len(values) or len(set(values)) != len(values):
            raise ValueError(f"bad slot {words!r}")
        if len({len(v.split(" ")) for v in values}) != 1 or not all(re.fullmatch(r"[A-Za-z ]+", v) for v in values):
            raise ValueError(f"slot {words!r}: values must be letters, with the same number of words")
        total = sum(w)
        return cls(values, tuple(x / total for x in w))

    def entropy(self) -> float:
        return -sum(p * math.log(p) for p in self.probs if p > 0)


def _zipf(n: int) -> tuple[float, ...]:
    return tuple(1.0 / (k + 1) for k in range(n))


SLOTS: dict[str, Slot] = {
    "adj": Slot.make("kind|brave|shy|happy|curious|clever|gentle|silly|quiet|lazy|busy|proud|sleepy|funny|"
                     "friendly|grumpy"),
    "animal": Slot.make("cat|dog|rabbit|fox|bear|mouse|duck|frog|owl|pig|horse|lion|turtle|bird|sheep|goat",
                        _zipf(16)),
    "name": Slot.make("Lily|Mia|Emma|Zoe|Anna|Sara|Lucy|Nina|Tom|Ben|Max|Sam|Leo|Jack|Tim|Finn"),
    "home": Slot.make("a small house|a big tree|a cozy cave|an old barn|a green field|a quiet village|"
                      "a tall tower|a busy town"),
    "friend": Slot.make("Rosa|Kim|Omar|Ivy|Jake|Ella|Noah|Ruby"),
    "color": Slot.make("red|blue|green|yellow|pink|purple|orange|white", _zipf(8)),
    "thing": Slot.make("ball|stone|shell|key|box|hat|leaf|flower"),
    "spot": Slot.make("river|garden|hill|pond|park|beach|forest|lake"),
    "activity": Slot.make("play|swim|dance|read|paint|run|jump|explore"),
    "feeling": Slot.make("happy|sad|sleepy|excited|calm|scared|proud|hungry", _zipf(8)),
    "weather": Slot.make("grey|dark|bright|cloudy|clear|pink|stormy|blue"),
    "size": Slot.make("tiny|giant|shy|noisy|hungry|friendly|lost|old"),
    "creature": Slot.make("bee|snail|squirrel|kitten|puppy|worm|chick|beetle"),
    "food": Slot.make("bread|apples|cookies|cake|honey|soup|berries|carrots"),
    "tune": Slot.make("happy|sad|long|short|funny|soft|loud|sweet"),
}

# Cast variables: drawn once per story (in this order), from the slot named on the right.
CAST: dict[str, str] = {"adj": "adj", "animal": "animal", "name": "name", "home": "home",
                        "friend_animal": "animal", "friend": "friend"}
_GIRLS = frozenset("Lily Mia Emma Zoe Anna Sara Lucy Nina".split())
# Copies that depend on the cast: the hero's pronouns.
DERIVED: dict[str, Callable[[dict[str, str]], str]] = {
    "he": lambda c: "she" if c["name"] in _GIRLS else "he",
    "He": lambda c: "She" if c["name"] in _GIRLS else "He",
    "his": lambda c: "her" if c["name"] in _GIRLS else "his",
    "His": lambda c: "Her" if c["name"] in _GIRLS else "His",
}

# {x}: a cast value or a derived copy; [x]: a fresh draw from slot x.
OPENING = ("Once upon a time, there was a {adj} {animal} named {name}. {He} lived in {home}. "
           "{His} best friend was a {friend_animal} named {friend}.")
MIDDLES = (
    "One day, {name} found a [color] [thing] near the [spot].",
    "Then {name} and {friend} went to the [spot] to [activity].",
    "Later, {he} felt [feeling] because the sky was [weather].",
    "Suddenly, a [size] [creature] came and asked {name} for [food].",
    "After that, {friend} gave {name} some [food] and they ate it together.",
    "At night, {name} dreamed about a [color] [creature].",
    "Every morning, {name} liked to [activity] with {friend}.",
    "Sometimes {he} sang a [tune] song to the [creature].",
)
ENDINGS = (
    "In the end, {name} and {friend} were [feeling].",
    "From then on, {name} always shared {his} [food] with {friend}.",
    "Finally, the [size] [creature] went home to sleep.",
    "That night, {name} smiled and closed {his} eyes.",
)
K_VALUES = (1, 2, 3, 4, 5)
K_PROBS = (0.1, 0.2, 0.3, 0.25, 0.15)

# A piece: (kind, name or literal text, has a space in front). Kinds: "lit", "cast", "derived", "fresh".
Piece = tuple[str, str, bool]


def _pieces(template: str) -> list[Piece]:
    """Cut a template into literal runs and placeholders; a placeholder takes the space in front of it."""
    out: list[Piece] = []
    for part in re.split(r"(\{\w+\}|\[\w+\])", template):
        if not part:
            continue
        if part[0] in "{[":
            name = part[1:-1]
            kind = "fresh" if part[0] == "[" else ("cast" if name in CAST else "derived")
            if (kind == "fresh" and name not in SLOTS) or (kind == "derived" and name not in DERIVED):
                raise ValueError(f"unknown placeholder {part} in {template!r}")
            space = bool(out) and out[-1][0] == "lit" and out[-1][1].endswith(" ")
            if space:
                out[-1] = ("lit", out[-1][1][:-1], out[-1][2])
                if not out[-1][1]:
                    out.pop()
            elif out:
                raise ValueError(f"placeholder {part} must follow a space in {template!r}")
            out.append((kind, name, space))
        else:
            out.append(("lit", part, False))
    return out


def _check_grammar() -> None:
    """The conditions under which the text determines every draw (see the module docstring)."""
    firsts = [t.split(" ")[0].strip(",") for t in MIDDLES + ENDINGS]
    if len(set(firsts)) != len(firsts) or any(f.startswith(("{", "[")) for f in firsts):
        raise ValueError("every middle and ending template must begin with its own literal first word")
    opening = {name for kind, name, _ in _pieces(OPENING) if kind == "cast"}
    if opening != set(CAST):
        raise ValueError("the opening must show every cast value")


_check_grammar()
_OPENING, _MIDDLES, _ENDINGS = _pieces(OPENING), [_pieces(t) for t in MIDDLES], [_pieces(t) for t in ENDINGS]
_K = Slot(tuple(str(k) for k in K_VALUES), K_PROBS)
_CUM = {name: list(accumulate(s.probs)) for name, s in SLOTS.items()}
_CUM_K = list(accumulate(K_PROBS))


@dataclass(frozen=True)
class Story:
    text: str
    logprob: float  # natural log of the probability of the draws that made it
    pieces: tuple[str, ...]  # the text, cut where no tokenizer merges (pieces join to `text`)


def _draw(rng: random.Random, cum: list[float], probs: tuple[float, ...]) -> tuple[int, float]:
    i = min(bisect_right(cum, rng.random() * cum[-1]), len(probs) - 1)
    return i, math.log(probs[i])


def story(seed: int, split: str, index: int) -> Story:
    """Story number `index` of a split: depends only on (seed, split, index), so any range can be made anywhere."""
    rng = random.Random(f"nanogemma-synthetic/{GRAMMAR_VERSION}/{seed}/{split}/{index}")
    logp = 0.0
    cast: dict[str, str] = {}
    for var, slot in CAST.items():
        i, lp = _draw(rng, _CUM[slot], SLOTS[slot].probs)
        cast[var], logp = SLOTS[slot].values[i], logp + lp
    k, lp = _draw(rng, _CUM_K, K_PROBS)
    logp += lp
    sentences = [_OPENING]
    for _ in range(K_VALUES[k]):
        sentences.append(_MIDDLES[rng.randrange(len(_MIDDLES))])
        logp -= math.log(len(_MIDDLES))
    sentences.append(_ENDINGS[rng.randrange(len(_ENDINGS))])
    logp -= math.log(len(_ENDINGS))
    pieces: list[str] = []
    for n, sentence in enumerate(sentences):
        for j, (kind, name, space) in enumerate(sentence):
            if kind == "lit":
                text = name
            elif kind == "cast":
                text = cast[name]
            elif kind == "derived":
                text = DERIVED[name](cast)
            else:
                i, lp = _draw(rng, _CUM[name], SLOTS[name].probs)
                text, logp = SLOTS[name].values[i], logp + lp
            lead = " " if space or (j == 0 and n > 0) else ""
            pieces.append(lead + text)
    return Story("".join(pieces), logp, tuple(pieces))


def stories(count: int, seed: int = 0, split: str = "train", start: int = 0) -> Iterator[str]:
    """The texts of stories start .. start+count-1 of a split."""
    for i in range(start, start + count):
        yield story(seed, split, i).text


def entropy_per_document() -> float:
    """H(doc) in nats: the exact entropy of one story (see the module docstring)."""
    def fresh(pieces: list[Piece]) -> float:
        return sum(SLOTS[name].entropy() for kind, name, _ in pieces if kind == "fresh")

    middle = math.log(len(MIDDLES)) + sum(fresh(p) for p in _MIDDLES) / len(MIDDLES)
    ending = math.log(len(ENDINGS)) + sum(fresh(p) for p in _ENDINGS) / len(ENDINGS)
    cast = sum(SLOTS[slot].entropy() for slot in CAST.values())
    return cast + fresh(_OPENING) + _K.entropy() + _mean_k() * middle + ending


def _mean_k() -> float:
    return sum(k * p for k, p in zip(K_VALUES, K_PROBS, strict=True))


def expected_tokens(count: Callable[[str], int], framing: int = 1) -> float:
    """E[T]: the expected number of tokens of a story, plus `framing` tokens (end-of-text, <bos>) per story.

    `count(text)` is the number of tokens of a text. Exact when the tokenizer's counts are additive over
    the story's pieces (`token_counts_are_additive`).
    """
    cache: dict[str, int] = {}

    def n(text: str) -> int:
        if text not in cache:
            cache[text] = count(text)
        return cache[text]

    # The distribution of each cast value, and of each derived copy (a function of the hero's name).
    dist: dict[str, list[tuple[str, float]]] = {
        var: list(zip(SLOTS[slot].values, SLOTS[slot].probs, strict=True)) for var, slot in CAST.items()}
    names = dist["name"]
    for d, f in DERIVED.items():
        dist[d] = [(f({"name": v}), p) for v, p in names]

    def sentence(pieces: list[Piece], first: bool) -> float:
        total = 0.0
        for j, (kind, name, space) in enumerate(pieces):
            lead = " " if space or (j == 0 and not first) else ""
            if kind == "lit":
                total += n(lead + name)
            elif kind == "fresh":
                s = SLOTS[name]
                total += sum(p * n(lead + v) for v, p in zip(s.values, s.probs, strict=True))
            else:
                total += sum(p * n(lead + v) for v, p in dist[name])
        return total

    middle = sum(sentence(p, False) for p in _MIDDLES) / len(_MIDDLES)
    ending = sum(sentence(p, False) for p in _ENDINGS) / len(_ENDINGS)
    return sentence(_OPENING, True) + _mean_k() * middle + ending + framing


def token_counts_are_additive(count: Callable[[str], int], samples: int = 200, seed: int = 0) -> bool:
    """Whether count(story) equals the sum of count(piece) on `samples` sampled stories."""
    for i in range(samples):
        s = story(seed, "check", i)
        if count(s.text) != sum(count(p) for p in s.pieces):
            return False
    return True


def entropy_report(count: Callable[[str], int], framing: int = 1) -> dict[str, float | bool]:
    """The figures a trained model's validation loss is compared with, for one tokenizer."""
    h = entropy_per_document()
    t = expected_tokens(count, framing)
    return {
        "grammar_version": GRAMMAR_VERSION,
        "entropy_nats_per_document": h,
        "expected_tokens_per_document": t,
        "entropy_nats_per_token": h / t,
        "exact": token_counts_are_additive(count),
    }
