"""`chat:prompts`: 1,000 short, varied real-language instructions and questions, written by hopd.

No data set can be downloaded where hopd is tested, so the real-pair recipe and study use this
file: everyday questions, explanations, lists, arithmetic, word meanings, short writing tasks.
It has no reference answers (no checker fits free text), so runs on it are measured by the
held-out reverse KL, the teacher's NLL and the degeneration metrics (`hopd.quality`).

The shipped file `hopd/data/chat_prompts.jsonl` is exactly `python -m hopd.tasks.chat_prompts`
(a test checks it): every prompt a template with its fillers, shuffled with a fixed seed. The
held-out rows are chosen by the same prompt hash as any JSONL file's.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "data" / "chat_prompts.jsonl"
NAME = "chat:prompts"
N_PROMPTS = 1000

COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "Italy", "Kenya", "Mexico", "Norway",
             "Peru", "Spain", "Germany", "India", "Australia", "Chile", "Greece", "Portugal",
             "Sweden", "Turkey", "Vietnam", "Argentina", "Poland", "Ireland", "Morocco"]
CONCEPTS = ["photosynthesis", "gravity", "a volcano", "inflation", "a rainbow", "democracy",
            "an atom", "evaporation", "a black hole", "the internet", "a vaccine", "friction",
            "an ecosystem", "a leap year", "electricity", "a glacier", "compound interest",
            "a metaphor", "recycling", "an eclipse", "a habit", "a budget", "an algorithm",
            "the water cycle", "a tide", "a fossil", "a password", "a library", "a map", "an echo"]
ACTIVITIES = ["sleeping better", "learning a language", "saving money", "staying focused",
              "running a first 5k", "cooking rice", "writing an email", "keeping plants alive",
              "studying for an exam", "making friends", "drinking more water", "packing a bag",
              "public speaking", "cleaning a kitchen", "reading more books", "taking photos",
              "starting a garden", "waking up early", "walking a dog", "staying calm"]
TOPICS = ["the ocean", "autumn leaves", "a busy city", "a quiet morning", "coffee", "the moon",
          "a mountain trail", "rain on a window", "an old bridge", "a school bus", "the desert",
          "a birthday", "snow", "a market", "the stars", "a train station", "a garden", "bread",
          "a lighthouse", "summer"]
WORDS = ["brave", "ancient", "curious", "fragile", "generous", "humble", "vivid", "rapid",
         "gentle", "honest", "narrow", "polite", "rare", "silent", "stubborn", "tidy", "vast",
         "weary", "eager", "clumsy"]
ANIMALS = ["dolphin", "penguin", "bat", "shark", "frog", "whale", "eagle", "snake", "horse",
           "octopus", "rabbit", "turtle", "camel", "owl", "bee", "kangaroo"]
TASKS = ["make a cup of tea", "tie a shoelace", "boil an egg", "plant a seed", "change a light "
         "bulb", "fold a paper plane", "wash a wool sweater", "make a sandwich", "reset a router",
         "sharpen a pencil", "fix a flat bicycle tire", "write a thank-you note"]
PHRASES = ["good morning", "thank you", "where is the station", "I like apples", "see you soon",
           "the book is red", "how are you", "it is cold today"]
LANGUAGES = ["French", "Spanish", "German", "Italian"]
CATEGORIES = ["fruits", "colors", "planets", "musical instruments", "vegetables", "sports",
              "birds", "kitchen tools", "board games", "rivers", "trees", "metals"]
PLACES = ["beach", "forest", "library", "kitchen", "hospital", "farm", "museum", "train",
          "classroom", "bakery"]
THINGS = ["walking", "reading", "sleep", "exercise", "drinking water", "learning to code",
          "music", "tea", "journaling", "cycling"]
FIXED = ["Why is the sky blue?", "Why do cats purr?", "How many days are in a week?",
         "What is the boiling point of water?", "Why do leaves change color?",
         "How does a refrigerator keep food cold?", "What makes a good friend?",
         "Why do we have seasons?", "How do birds fly?", "What is the largest ocean?",
         "How many legs does a spider have?", "Why do we need sleep?",
         "What is the difference between weather and climate?", "How does a compass work?",
         "Why is exercise good for you?", "What is a prime number?",
         "How do plants drink water?", "Why does ice float?", "What is the speed of sound?",
         "How are rainbows formed?"]
ROLES = ["teacher", "doctor", "chef", "pilot", "farmer", "librarian", "firefighter", "gardener",
         "nurse", "baker", "scientist", "coach"]
PAIRS = ["cats and dogs", "tea and coffee", "trains and planes", "books and films",
         "summer and winter", "rivers and lakes", "pens and pencils", "bikes and cars",
         "cities and villages", "apples and oranges", "stars and planets", "email and letters"]
RUDE = ["Give me the salt.", "Move your bag.", "Send me the file now.", "Be quiet.",
        "Call me back.", "Close the door.", "Explain this again.", "Wait here."]
STARTS = ["The best part of the day is", "When it rains, I like to", "A good teacher always",
          "The old house on the hill", "My favorite meal is", "Every morning the baker",
          "The robot opened the door and", "On the first day of school"]
UNITS = [("minutes", "hour"), ("hours", "day"), ("days", "year"), ("months", "year"),
         ("centimeters", "meter"), ("grams", "kilogram"), ("seconds", "minute"),
         ("weeks", "year"), ("meters", "kilometer"), ("days", "week")]


def _templates() -> dict[str, list[str]]:
    """Every prompt of every template (some have more than the file draws)."""
    pairs = list(itertools.combinations(range(2, 40, 3), 2))
    return {
        "capital": [f"What is the capital of {c}?" for c in COUNTRIES],
        "country": [f"Tell me one interesting fact about {c}." for c in COUNTRIES],
        "explain": [f"Explain what {c} is in one sentence." for c in CONCEPTS],
        "simple": [f"Explain {c} to a ten-year-old." for c in CONCEPTS],
        "tips": [f"Give me three tips for {a}." for a in ACTIVITIES],
        "sentence": [f"Write a short sentence about {t}." for t in TOPICS],
        "haiku": [f"Write a haiku about {t}." for t in TOPICS],
        "add": [f"What is {a} plus {b}?" for a, b in pairs],
        "multiply": [f"What is {a} times {b}?" for a, b in pairs if a * b < 400],
        "word": [f"What does the word '{w}' mean?" for w in WORDS],
        "opposite": [f"What is the opposite of '{w}'?" for w in WORDS],
        "synonym": [f"Give a synonym for '{w}'." for w in WORDS],
        "use": [f"Use the word '{w}' in a sentence." for w in WORDS],
        "mammal": [f"Is a {a} a mammal?" for a in ANIMALS],
        "animal": [f"Where does a {a} live?" for a in ANIMALS],
        "howto": [f"How do I {t}?" for t in TASKS],
        "translate": [f"Translate '{p}' into {lang}." for p in PHRASES for lang in LANGUAGES],
        "list": [f"List three {c}." for c in CATEGORIES],
        "name": [f"Name a {c[:-1] if c.endswith('s') else c} that people often like."
                 for c in CATEGORIES],
        "describe": [f"Describe a {p} in one sentence." for p in PLACES],
        "benefits": [f"What are the benefits of {t}?" for t in THINGS],
        "fixed": FIXED,
        "subtract": [f"What is {b} minus {a}?" for a, b in pairs],
        "role": [f"Write one sentence a {r} might say at work." for r in ROLES],
        "ask": [f"What is a good question to ask a {r}?" for r in ROLES],
        "compare": [f"Compare {x} in one sentence." for x in PAIRS],
        "prefer": [f"Which is better for a rainy day, {x.replace(' and ', ' or ')}?"
                   for x in PAIRS],
        "polite": [f"Rewrite this more politely: '{r}'" for r in RUDE],
        "finish": [f"Finish this sentence: '{st}'" for st in STARTS],
        "units": [f"How many {a} are in a {b}?" for a, b in UNITS],
        "pack": [f"What should I pack for a trip to {c}?" for c in COUNTRIES],
        "rhyme": [f"Give two words that rhyme with '{w}'." for w in ["cat", "light", "tree", "day",
                  "cake", "rain", "star", "book", "bell", "moon", "ship", "hand"]],
        "fact": [f"Tell me a fun fact about the {a}." for a in ANIMALS],
        "why": [f"Why is {t} good for people?" for t in THINGS],
        "story": [f"Write the first line of a story about {t}." for t in TOPICS],
        "title": [f"Suggest a title for an essay about {c}." for c in CONCEPTS],
        "example": [f"Give an example of {c}." for c in CATEGORIES],
        "divide": [f"What is {a * b} divided by {a}?" for a in range(2, 10) for b in range(3, 12)
                   if (a + b) % 2],
        "everyday": [f"Describe {c} using an everyday example." for c in CONCEPTS],
        "europe": [f"Is {c} in Europe?" for c in COUNTRIES],
        "language": [f"What language is spoken in {c}?" for c in COUNTRIES],
        "job": [f"What does a {r} do?" for r in ROLES],
        "motto": [f"Write a one-line motto for a {r}." for r in ROLES],
        "sound": [f"What sound does a {a} make?" for a in ANIMALS],
        "define": [f"Give a short definition of '{w}'." for w in WORDS],
        "food": [f"What is a traditional food from {c}?" for c in COUNTRIES],
        "season": [f"What is the weather usually like in {c} in winter?" for c in COUNTRIES],
    }


def prompts(n: int = N_PROMPTS, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct prompts drawn round-robin over the templates, then shuffled."""
    rng = random.Random(seed)
    pools = {k: rng.sample(v, len(v)) for k, v in _templates().items()}
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n and any(pools.values()):
        for kind, pool in pools.items():
            if pool and len(rows) < n:
                text = pool.pop()
                if text not in seen:
                    seen.add(text)
                    rows.append({"prompt": text, "kind": kind})
    if len(rows) < n:
        raise ValueError(f"the templates hold only {len(rows)} prompts, fewer than {n}")
    rng.shuffle(rows)
    return rows


def write(path: Path = PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in prompts()), encoding="utf-8")


if __name__ == "__main__":
    write()
    print(f"wrote {PATH}")
