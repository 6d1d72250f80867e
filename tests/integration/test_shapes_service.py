"""The trained shapes model as an oracle for the whole served path."""

from __future__ import annotations

import pytest

from models.shapes.data import HELD_OUT_SEED, QUESTION_TYPES, make_samples
from models.shapes.evaluate import service_accuracy, service_retrieval_top1

pytestmark = pytest.mark.integration


def test_held_out_questions_through_the_service(url):
    samples = make_samples(240, seed=HELD_OUT_SEED)
    accuracy = service_accuracy(url, samples, concurrency=32)
    print("service accuracy:", accuracy)
    assert set(accuracy) == set(QUESTION_TYPES)
    assert all(v >= 0.98 for v in accuracy.values()), accuracy


def test_embedding_retrieval_through_the_service(url):
    samples = make_samples(200, seed=HELD_OUT_SEED + 1)
    top1 = service_retrieval_top1(url, samples)
    print("service retrieval top-1:", top1)
    assert top1 >= 0.98


def test_held_out_questions_through_the_openai_route(url):
    samples = make_samples(120, seed=HELD_OUT_SEED + 2)
    accuracy = service_accuracy(url, samples, concurrency=32, route="openai")
    print("openai route accuracy:", accuracy)
    assert all(v >= 0.98 for v in accuracy.values()), accuracy
