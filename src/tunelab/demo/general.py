"""General questions for the demo's anti-forgetting slice and retention check.

No general instruction set ships offline, so the demo lets the base model answer
these itself (self-distillation, seed 003's general:domain mixing advice) and trains
on its own answers for half of them. The other half is held out: after tuning, the
model should still answer them as it did before. Each question carries a keyword that
a correct answer contains, so retention is also measured as keyword accuracy.
"""

from __future__ import annotations

# (question, keywords a correct answer contains: alternatives separated by |, case-insensitive)
GENERAL_QUESTIONS: list[tuple[str, str]] = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of the United Kingdom?", "London"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What planet do we live on?", "Earth"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What star is at the center of our solar system?", "Sun"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
    ("What is the main gas in the air we breathe?", "nitrogen"),
    ("How many days are there in a week?", "seven|7"),
    ("How many continents are there on Earth?", "seven|7"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("What color is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("Which organ do humans use to breathe?", "lungs"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the longest river in Africa?", "Nile"),
    ("How many legs does a spider have?", "eight|8"),
]


def keyword_hit(answer: str, keywords: str) -> bool:
    """True when ``answer`` contains one of the ``|``-separated keywords (case-insensitive)."""
    text = answer.casefold()
    return any(k.casefold() in text for k in keywords.split("|"))
