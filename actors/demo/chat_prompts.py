"""Chat requests for distilling the smol drafter, and held-out ones for measuring it.

The drafter is scored on what the target writes when answering chat requests, so it is trained
on the target's own answers to requests of that kind. Training requests are made from templates
(general topics, and Python tasks whose wording comes from docstrings in the standard library's
training split); the held-out requests are written by hand and never appear in training.
"""
from __future__ import annotations

import ast
import random

from actors.demo import corpus

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning",
    "climate change", "the immune system", "volcanoes", "the Roman Empire", "electric cars",
    "the internet", "recycling", "the solar system", "healthy sleep", "compound interest",
    "the printing press", "honey bees", "earthquakes", "vaccines", "renewable energy", "the moon landing",
    "coffee", "the human heart", "rainbows", "plate tectonics", "the stock market", "chess", "jazz music",
    "the Great Wall of China", "DNA", "gravity", "time management", "public speaking", "gardening",
    "the Olympic Games", "dinosaurs", "ocean tides", "the Renaissance", "electricity", "friendship",
    "sorting algorithms", "recursion", "databases", "version control with git", "unit testing",
    "object-oriented programming", "regular expressions", "the HTTP protocol", "binary numbers",
    "encryption", "operating systems", "cloud computing", "linked lists", "big O notation",
]
TEMPLATES = [
    "Explain {} in simple terms.", "Give me three interesting facts about {}.",
    "Write a short paragraph about {}.", "What are the main ideas behind {}?",
    "Summarize {} for a high school student.", "What should a beginner know about {}?",
]
CODE_TEMPLATES = [
    "Write a Python function `{name}({args})`. It should do this: {doc}",
    "Implement `{name}({args})` in Python: {doc}",
    "How would you write a function `{name}` in Python? {doc}",
]

# Written by hand; never produced by the templates above.
HELD_OUT = [
    "Write a Python function that tells whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a hash table is to a beginner.",
    "Give me three tips for writing readable code.",
    "Translate 'good morning' into Spanish and German.",
    "Write a haiku about the sea.",
    "Write a Python function that reverses the words in a sentence.",
    "How do I read a CSV file in Python?",
    "Why is the sky blue?",
    "Write a function that returns the n-th Fibonacci number, with a docstring.",
    "List five fruits that are high in vitamin C.",
    "What is the difference between a list and a tuple in Python?",
]


def _function_tasks(limit: int, rng: random.Random) -> list[str]:
    """Python tasks from documented public functions in the training split."""
    out = []
    train, _ = corpus.split()
    for p in train:
        try:
            tree = ast.parse(corpus.read(p))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 30:
                    continue
                first = doc.strip().split("\n\n")[0].replace("\n", " ")[:200]
                args = ", ".join(a.arg for a in node.args.args if a.arg != "self")
                out.append(rng.choice(CODE_TEMPLATES).format(name=node.name, args=args, doc=first))
    rng.shuffle(out)
    return out[:limit]


def training_requests(n: int, seed: int = 0) -> list[str]:
    """`n` deterministic training requests, half general, half Python tasks."""
    rng = random.Random(seed)
    general = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    rng.shuffle(general)
    code = _function_tasks(n - n // 2, rng)
    mixed = general[:n // 2] + code
    rng.shuffle(mixed)
    held = set(HELD_OUT)
    return [m for m in mixed if m not in held]
