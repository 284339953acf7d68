"""Shared fixtures for the ar_model tests: a shapes-like caption set and one small trained tokenizer."""

from __future__ import annotations

import random

import pytest

from ar_model.text_tokenizer import TextTokenizer, train_text_tokenizer

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
RELATIONS = ("left of", "to the right of", "above", "below", "and")
TOKENIZER_SIDE = 16  # max image side of the shared tokenizer


def make_captions(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` captions like the procedural shapes data ("two red circles above a blue star")."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        obj = f"{rng.choice(('a', 'one', 'two', 'three'))} {rng.choice(COLORS)} {rng.choice(SHAPES)}"
        if rng.random() < 0.5:
            obj += f" {rng.choice(RELATIONS)} a {rng.choice(COLORS)} {rng.choice(SHAPES)}"
        out.append(rng.choice(("{}", "a picture of {}", "{} on a black background")).format(obj))
    return out


@pytest.fixture(scope="session")
def captions() -> list[str]:
    return make_captions()


@pytest.fixture(scope="session")
def text_tokenizer(captions: list[str]) -> TextTokenizer:
    return train_text_tokenizer(captions, None, vocab_size=400, max_image_side=TOKENIZER_SIDE)
