"""Prompt-lookup drafting: the cheap backup when the speculation cache misses.

Find the most recent earlier occurrence of the sequence's last n tokens (longest n first) and
propose what followed it. Costs no model forward, so a miss wastes no drafter time; code and
repetitive text hit often, prose rarely.
"""
from __future__ import annotations


def propose_ngram(tokens: list[int], k: int, max_n: int = 3) -> list[int]:
    for n in range(min(max_n, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i:i + n] == tail:
                return tokens[i + n:i + n + k]
    return []
