"""A labelled set of prompts whose answers are checked mechanically, for
measuring how often each LLM answers right and calibrating when the device's
own confidence may be trusted (partitioner.quality).

Five kinds, each a few-shot completion prompt (the cloud's Gemma 3 270M is a
base model with no chat template, and the device's SmolLM2 continues plain
text as well): two-number arithmetic, copying a word list, reversing a word,
a yes/no question answered in a fixed format, and facts from fixed tables
(capitals, chemical symbols, the next weekday or month, opposites). The
answer is the completion up to its first newline, compared after trimming
spaces and a final full stop. Items are drawn by a seeded generator, so the
set is the same on every machine, and split into calibration and test halves
by item, never by kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest", "Canada": "Ottawa", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Turkey": "Ankara",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "India": "New Delhi",
}
SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O", "sodium": "Na",
    "iron": "Fe", "gold": "Au", "silver": "Ag", "copper": "Cu", "lead": "Pb", "tin": "Sn", "zinc": "Zn",
    "potassium": "K", "calcium": "Ca", "neon": "Ne", "sulfur": "S", "chlorine": "Cl", "mercury": "Hg",
    "uranium": "U",
}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "happy": "sad",
    "open": "closed", "old": "new", "wet": "dry", "early": "late", "full": "empty", "hard": "soft",
    "strong": "weak", "rich": "poor", "high": "low", "long": "short", "thick": "thin", "loud": "quiet",
}
WORDS = ["apple", "river", "stone", "cloud", "paper", "green", "house", "tiger", "piano", "window", "garden",
         "candle", "silver", "rocket", "planet", "forest", "bottle", "yellow", "button", "circle", "dragon",
         "island", "ladder", "mirror", "pencil", "rabbit", "summer", "turtle", "violin", "winter"]


@dataclass(frozen=True)
class Item:
    kind: str
    prompt: str
    answer: str

    def correct(self, completion: str) -> bool:
        return normalised(first_line(completion)) == normalised(self.answer)


def first_line(completion: str) -> str:
    return completion.strip(" ").split("\n", 1)[0]


def normalised(text: str) -> str:
    return text.strip().removesuffix(".").strip().lower()


def few_shot(examples: list[tuple[str, str]], question: str) -> str:
    """Q/A pairs, then the question: the answer is what follows "A:" up to the line's end."""
    shots = "".join(f"Q: {q}\nA: {a}\n" for q, a in examples)
    return f"{shots}Q: {question}\nA:"


def _arithmetic(rng: random.Random) -> Item:
    op = rng.choice(["+", "-", "*"])
    a, b = (rng.randint(2, 60), rng.randint(2, 40)) if op != "*" else (rng.randint(2, 12), rng.randint(2, 12))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    examples = [("What is 12 + 7?", "19"), ("What is 30 - 14?", "16"), ("What is 6 * 4?", "24")]
    return Item("arithmetic", few_shot(examples, f"What is {a} {op} {b}?"), str(value))


def _copy(rng: random.Random) -> Item:
    words = " ".join(rng.sample(WORDS, rng.randint(3, 6)))
    examples = [("Repeat exactly: sun moon star", "sun moon star"), ("Repeat exactly: red blue", "red blue")]
    return Item("copy", few_shot(examples, f"Repeat exactly: {words}"), words)


def _reverse(rng: random.Random) -> Item:
    if rng.random() < 0.5:
        word = rng.choice(WORDS)
        examples = [("Spell 'cat' backwards.", "tac"), ("Spell 'lemon' backwards.", "nomel")]
        return Item("reverse", few_shot(examples, f"Spell '{word}' backwards."), word[::-1])
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
    examples = [("Reverse the list: 1 2 3", "3 2 1"), ("Reverse the list: 7 0 4 4", "4 4 0 7")]
    return Item("reverse", few_shot(examples, f"Reverse the list: {' '.join(digits)}"), " ".join(reversed(digits)))


def _format(rng: random.Random) -> Item:
    a, b = rng.sample(range(1, 100), 2)
    examples = [("Is 9 greater than 4? Answer yes or no.", "yes"), ("Is 2 greater than 8? Answer yes or no.", "no")]
    return Item("format", few_shot(examples, f"Is {a} greater than {b}? Answer yes or no."), "yes" if a > b else "no")


def _fact(rng: random.Random) -> Item:
    table = rng.choice(["capital", "symbol", "weekday", "month", "opposite"])
    if table == "capital":
        country = rng.choice(sorted(CAPITALS))
        examples = [("What is the capital of Japan?", "Tokyo"), ("What is the capital of Italy?", "Rome")]
        return Item("fact", few_shot(examples, f"What is the capital of {country}?"), CAPITALS[country])
    if table == "symbol":
        element = rng.choice(sorted(SYMBOLS))
        examples = [("What is the chemical symbol of oxygen?", "O"), ("What is the chemical symbol of iron?", "Fe")]
        return Item("fact", few_shot(examples, f"What is the chemical symbol of {element}?"), SYMBOLS[element])
    if table in ("weekday", "month"):
        names = WEEKDAYS if table == "weekday" else MONTHS
        i = rng.randrange(len(names))
        examples = [("What comes after Monday?", "Tuesday"), ("What comes after March?", "April")]
        return Item("fact", few_shot(examples, f"What comes after {names[i]}?"), names[(i + 1) % len(names)])
    word = rng.choice(sorted(OPPOSITES))
    examples = [("What is the opposite of good?", "bad"), ("What is the opposite of yes?", "no")]
    return Item("fact", few_shot(examples, f"What is the opposite of {word}?"), OPPOSITES[word])


KINDS: dict[str, Callable[[random.Random], Item]] = {
    "arithmetic": _arithmetic, "copy": _copy, "reverse": _reverse, "format": _format, "fact": _fact,
}


def labelled_set(size: int = 400, seed: int = 2026) -> list[Item]:
    """``size`` distinct items, the kinds in turn (as even as ``size`` allows)."""
    rng = random.Random(seed)
    items: dict[str, Item] = {}
    kinds = list(KINDS.values())
    attempts = 0
    while len(items) < size:
        item = kinds[len(items) % len(kinds)](rng)
        items.setdefault(item.prompt, item)
        attempts += 1
        if attempts > 50 * size:
            raise ValueError(f"only {len(items)} distinct items can be drawn, not {size}")
    return list(items.values())


def split(items: list[Item], seed: int = 2026) -> tuple[list[Item], list[Item]]:
    """Calibration and test halves, shuffled by a seeded generator."""
    shuffled = items[:]
    random.Random(seed + 1).shuffle(shuffled)
    half = len(shuffled) // 2
    return shuffled[:half], shuffled[half:]
