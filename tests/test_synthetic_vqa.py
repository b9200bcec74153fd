"""Task A (prismatic/vla/datasets/synthetic_vqa.py): every answer checked against the image alone.

Reference: an independent reader that knows only the drawing colours and the pixel map. It finds each object as a
connected region of one exact object colour, classifies its shape from the pixels (hole in the centre -> ring,
filled bounding box -> block, ~pi/4 of it -> ball, else cross), parses the question text with regular
expressions and answers it from what it found. Positions: the region's centroid, within 0.02 workspace units.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from prismatic.training.vqa import QuestionEncoder
from prismatic.vla.datasets.synthetic_vqa import (
    COUNT_WORDS,
    QUESTION_TYPES,
    VQA_SPEC,
    answer_vocabulary,
    make_example,
)
from prismatic.vla.tokenizer import load_qwen_tokenizer

HALF_SPAN = 96.0  # (256 - 2 * 32) / 2 pixels per workspace unit, the pick-and-lift task's map


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, as [n, 2] (row, col) pixel lists (plain flood fill)."""
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        regions.append(np.array(pixels))
    return regions


def read_scene(image: np.ndarray) -> list[dict]:
    """Objects found in the pixels: colour name, shape name, workspace xy."""
    found = []
    for color, rgb in zip(VQA_SPEC.color_names, VQA_SPEC.color_rgb):
        for region in _components(np.all(image == np.array(rgb, dtype=np.uint8), axis=-1)):
            rows, cols = region[:, 0], region[:, 1]
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            fill = len(region) / box
            centre = (int(round(rows.mean())), int(round(cols.mean())))
            hole = not np.all(image[centre] == np.array(rgb, dtype=np.uint8))
            shape = "ring" if hole else "block" if fill > 0.9 else "ball" if fill > 0.7 else "cross"
            xy = ((cols.mean() - 128.0) / HALF_SPAN, (rows.mean() - 128.0) / HALF_SPAN)
            found.append({"color": color, "shape": shape, "xy": xy})
    return found


def _third(value: float, names: tuple[str, str, str]) -> str:
    return names[0] if value < -1 / 3 else names[2] if value > 1 / 3 else names[1]


def answer_from_pixels(question: str, objects: list[dict]) -> str:
    def the(color: str, shape: str) -> dict:
        matches = [o for o in objects if o["color"] == color and o["shape"] == shape]
        assert len(matches) == 1, (question, matches)
        return matches[0]

    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        (o,) = [o for o in objects if o["shape"] == m[1]]
        return o["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objects if o["color"] == m[1]]
        return o["shape"]
    if question == "how many objects are there?":
        return COUNT_WORDS[len(objects)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return COUNT_WORDS[sum(o["shape"] == m[1] for o in objects)]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) left or right of the (\w+) (\w+)\?", question):
        a, b = the(m[1], m[2]), the(m[3], m[4])
        return "left" if a["xy"][0] < b["xy"][0] else "right"
    if m := re.fullmatch(r"is the (\w+) (\w+) on the left, in the middle or on the right\?", question):
        return _third(the(m[1], m[2])["xy"][0], ("left", "middle", "right"))
    if m := re.fullmatch(r"is the (\w+) (\w+) at the top, in the middle or at the bottom\?", question):
        return _third(the(m[1], m[2])["xy"][1], ("top", "middle", "bottom"))
    raise AssertionError(f"unparsed question {question!r}")


def test_answers_match_an_independent_pixel_reader():
    examples = [make_example(3, i) for i in range(150)]
    assert {e.qtype for e in examples} == set(QUESTION_TYPES)
    for e in examples:
        found = read_scene(e.image)
        assert sorted((o["color"], o["shape"]) for o in found) == sorted(
            (VQA_SPEC.color_names[o.color], VQA_SPEC.shape_names[o.shape]) for o in e.objects
        )
        for o in e.objects:  # the pixel centroid is where the generator says the object is
            (match,) = [
                f for f in found
                if (f["color"], f["shape"]) == (VQA_SPEC.color_names[o.color], VQA_SPEC.shape_names[o.shape])
            ]  # fmt: skip
            assert np.allclose(match["xy"], o.xy, atol=0.02)
        assert answer_from_pixels(e.question, found) == e.answer, e.question


def test_examples_are_deterministic_and_splits_differ():
    a, b = make_example(0, 7), make_example(0, 7)
    assert np.array_equal(a.image, b.image)
    assert (a.question, a.answer) == (b.question, b.answer)
    heldout = make_example(0, 7, "heldout")
    assert not np.array_equal(a.image, heldout.image)
    with pytest.raises(KeyError):
        make_example(0, 7, "validation")


def test_question_types_and_answers_are_balanced():
    examples = [make_example(1, i) for i in range(1400)]
    types = Counter(e.qtype for e in examples)
    assert all(0.08 < types[t] / len(examples) < 0.22 for t in QUESTION_TYPES), types  # uniform would be 1/7
    for qtype, pair in (("exist", ("yes", "no")), ("relation", ("left", "right"))):
        answers = Counter(e.answer for e in examples if e.qtype == qtype)
        assert 0.4 < answers[pair[0]] / (answers[pair[0]] + answers[pair[1]]) < 0.6, answers


def test_every_answer_is_one_token():
    encoder = QuestionEncoder(load_qwen_tokenizer())
    ids = [encoder.answer_id(word) for word in answer_vocabulary()]
    assert len(set(ids)) == len(ids)
    seen = {make_example(2, i).answer for i in range(300)}
    assert seen <= set(answer_vocabulary())
    with pytest.raises(ValueError, match="must be one token"):
        encoder.answer_id("yellow block")
