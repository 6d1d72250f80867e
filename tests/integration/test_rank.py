"""/rank on the shapes CLIP: held-out images find their own description first, and a text
query finds its image; scores are the cosine similarities /embed's vectors give."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from models.shapes.data import HELD_OUT_SEED, all_captions, make_samples

pytestmark = pytest.mark.integration


def b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def rank(url: str, **body) -> dict:
    r = httpx.post(url + "/rank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_held_out_images_rank_their_own_description_first(url):
    captions = all_captions()
    samples = make_samples(24, HELD_OUT_SEED)
    for sample in samples:
        out = rank(url, query_image_b64=b64(sample.image), candidates=captions)
        results = out["results"]
        assert out["query"] == "image" and len(results) == len(captions)
        assert results[0]["text"] == sample.caption, (sample.caption, results[:3])
        assert sorted(r["index"] for r in results) == list(range(len(captions)))
        assert [r["score"] for r in results] == sorted((r["score"] for r in results),
                                                       reverse=True)
        assert all(captions[r["index"]] == r["text"] and r["kind"] == "text" for r in results)


def test_a_text_query_ranks_its_image_first_with_embed_scores(url):
    samples = {s.caption: s for s in make_samples(60, HELD_OUT_SEED + 1)}
    picked = list(samples.values())[:6]  # six images of six different descriptions
    images = [b64(s.image) for s in picked]
    for target, sample in enumerate(picked):
        out = rank(url, query=sample.caption, candidate_images_b64=images)
        assert out["query"] == "text"
        assert out["results"][0] == {**out["results"][0], "kind": "image", "index": target}
    embed = httpx.post(url + "/embed", json={"texts": [picked[0].caption],
                                             "images_b64": images}, timeout=60).json()
    expected = np.asarray(embed["image_embeddings"]) @ np.asarray(embed["text_embeddings"][0])
    got = {r["index"]: r["score"] for r in rank(url, query=picked[0].caption,
                                                  candidate_images_b64=images)["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(images))], expected, atol=1e-5)


def test_rank_takes_uploads_and_mixed_candidates(url):
    sample = make_samples(1, HELD_OUT_SEED + 2)[0]
    other = next(s for s in make_samples(20, HELD_OUT_SEED + 3) if s.caption != sample.caption)
    png = base64.b64decode(b64(sample.image))
    r = httpx.post(url + "/rank", timeout=60, files=[
        ("query_image", ("q.png", png, "image/png")),
        ("candidate_images", ("same.png", png, "image/png")),
    ], data={"candidates": f'["{other.caption}", "{sample.caption}"]'})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["kind"], x["index"]) for x in results[:2]] == [("image", 0), ("text", 1)]
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
