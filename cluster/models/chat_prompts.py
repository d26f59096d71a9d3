"""Chat requests for distilling the smol drafter, and held-out ones for measuring it.

The drafter is scored on what the target writes when answering chat requests, so it is trained
on the target's own answers to requests of that kind. Training requests are made from templates
(general topics, and Python tasks whose wording comes from docstrings in the standard library's
training split); the held-out requests are written by hand and never appear in training.
"""
from __future__ import annotations

import ast
import random

from cluster.models import corpus

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

# Everyday programming tasks, the kind of request the demo sends; phrased several ways. None of
# them is a held-out request (those are checked against below).
TASKS = [
    "checks whether a string is a palindrome", "computes the factorial of a number",
    "returns the largest element of a list", "counts the vowels in a string",
    "removes duplicates from a list while keeping the order", "checks whether a year is a leap year",
    "converts a temperature from Celsius to Fahrenheit", "returns the sum of the digits of an integer",
    "merges two sorted lists into one sorted list", "finds the greatest common divisor of two numbers",
    "checks whether two strings are anagrams", "flattens a nested list",
    "counts how often each word appears in a text", "returns the second largest number in a list",
    "checks whether a number is even", "computes the average of a list of numbers",
    "reverses a string", "sorts a list of dictionaries by a key", "checks whether a list is sorted",
    "returns all prime factors of a number", "converts a binary string to an integer",
    "capitalizes the first letter of every word", "finds the longest word in a sentence",
    "computes the power of a number without using **", "checks whether a number is a perfect square",
    "returns the n-th triangular number", "implements binary search on a sorted list",
    "implements bubble sort", "checks whether parentheses in a string are balanced",
    "returns the intersection of two lists", "computes the least common multiple of two numbers",
    "counts the lines in a text file", "checks whether a string contains only digits",
    "returns the list of even numbers from a list", "computes compound interest",
    "finds the missing number in a list from 1 to n", "checks whether a number is an Armstrong number",
    "rotates a list by k positions", "converts a decimal number to binary",
]
TASK_TEMPLATES = [
    "Write a Python function that {}.", "Write a function in Python that {}.",
    "Can you write a Python function that {}?", "Write a short Python program that {}.",
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
    """`n` deterministic training requests: a third general, a third everyday programming tasks,
    a third Python tasks worded from standard-library docstrings."""
    rng = random.Random(seed)
    general = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    rng.shuffle(general)
    tasks = [t.format(task) for task in TASKS for t in TASK_TEMPLATES]
    rng.shuffle(tasks)
    n_general, n_tasks = n // 3, n // 3
    code = tasks[:n_tasks] + _function_tasks(n - n_general - n_tasks, rng)
    mixed = general[:n_general] + code
    rng.shuffle(mixed)
    held = set(HELD_OUT)
    return [m for m in mixed if m not in held]
