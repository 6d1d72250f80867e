"""bench/serve.py against the real server (both LLM backends): a concurrency sweep and a Poisson
run, streamed and not, give complete JSON and a PNG with no failed request; a target that does not
answer /v1/models stops the run with exit code 2. The statistics and the image sets are checked
on fixed inputs."""

from __future__ import annotations

import base64
import datetime
import http.server
import io
import json
import subprocess
import threading

import pytest
from PIL import Image

from bench.images import LARGE_SIZES, prompts
from bench.serve import gaps, percentile, summary_ms, tpot
from tests.conftest import PY, ROOT, free_port

LEVEL_FIELDS = {
    "target", "url", "model", "images", "images_per_request", "load", "concurrency",
    "request_rate", "mode", "max_tokens", "warmup", "requests", "completed", "failed", "errors",
    "short_outputs", "tokens_from", "duration_s", "req_per_s", "output_tok_per_s",
    "input_tok_per_s", "img_per_s", "total_output_tokens", "total_input_tokens",
    "peak_in_flight", "e2e_ms", "ttft_ms", "tpot_ms", "itl_ms",
}
STATS = {"mean", "p50", "p90", "p99"}


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "bench/serve.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def check_stats(stats: dict) -> None:
    assert set(stats) == STATS, stats
    assert all(isinstance(stats[k], float) and stats[k] >= 0 for k in STATS), stats
    assert stats["p50"] <= stats["p90"] <= stats["p99"], stats


def check_level(r: dict, n: int, max_tokens: int, per_request: int = 1) -> None:
    assert set(r) == LEVEL_FIELDS, set(r) ^ LEVEL_FIELDS
    assert r["model"] == "shapes-llava"
    assert (r["requests"], r["completed"], r["failed"], r["errors"]) == (n, n, 0, []), r["errors"]
    assert r["total_output_tokens"] == n * max_tokens and r["short_outputs"] == 0
    assert r["tokens_from"] == "usage" and r["total_input_tokens"] > 0
    assert r["duration_s"] > 0 and r["req_per_s"] == pytest.approx(n / r["duration_s"])
    assert r["output_tok_per_s"] == pytest.approx(n * max_tokens / r["duration_s"])
    assert r["img_per_s"] == pytest.approx(r["req_per_s"] * per_request)
    check_stats(r["e2e_ms"])
    if r["mode"] == "stream":
        for name in ("ttft_ms", "tpot_ms"):
            check_stats(r[name])
        # ITL needs two content chunks in one stream; a short stream whose tokens queued up
        # while the API was busy comes as one chunk (lmm.pipeline._batches), and has no gap.
        if r["itl_ms"]["mean"] is None:
            assert set(r["itl_ms"]) == STATS and not any(r["itl_ms"].values()), r["itl_ms"]
        else:
            check_stats(r["itl_ms"])
        assert r["ttft_ms"]["p50"] <= r["e2e_ms"]["p99"]
    else:
        assert r["ttft_ms"] is None and r["tpot_ms"] is None and r["itl_ms"] is None


@pytest.mark.integration
def test_concurrency_sweep_two_targets_both_modes(url, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    p = bench("--target", f"ours={url}", "--target", f"again={url}", "--concurrency", "1", "2",
              "-n", "4", "--warmup", "1", "--max-tokens", "8", "--mode", "both",
              "--images", "shapes", "--out", str(out), "--plot", str(png))
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    header = data["header"]
    assert "bench/serve.py" in header["command"] and "--plot" in header["command"]
    assert datetime.datetime.fromisoformat(header["date"]).tzinfo is not None
    assert len(header["client"]["loadavg_start"]) == len(header["client"]["loadavg_end"]) == 3
    assert header["targets"] == [{"name": "ours", "url": url, "model": "shapes-llava"},
                                 {"name": "again", "url": url, "model": "shapes-llava"}]
    results = data["results"]
    # Level by level, the targets one after another.
    assert [(r["concurrency"], r["mode"], r["target"]) for r in results] == [
        (c, mode, t) for c in (1, 2) for mode in ("plain", "stream") for t in ("ours", "again")]
    for r in results:
        check_level(r, 4, 8)
        assert r["load"] == "concurrency" and r["request_rate"] is None
        assert r["images"] == "shapes" and r["peak_in_flight"] <= r["concurrency"]
    rows = [line for line in p.stdout.splitlines() if line.startswith(("| ours ", "| again "))]
    assert len(rows) == len(results)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
        image.verify()


@pytest.mark.integration
def test_poisson_arrivals_with_two_images_per_request(url, tmp_path):
    out = tmp_path / "rate.json"
    p = bench("--target", f"ours={url}", "--request-rate", "20", "inf", "-n", "4", "--warmup",
              "1", "--max-tokens", "8", "--mode", "stream", "--images", "repeat",
              "--images-per-request", "2", "--out", str(out), "--plot", str(tmp_path / "r.png"))
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["request_rate"] for r in results] == [20.0, "inf"]
    for r in results:
        check_level(r, 4, 8, per_request=2)
        assert r["load"] == "request_rate" and r["mode"] == "stream" and r["concurrency"] is None
    assert results[1]["peak_in_flight"] == 4  # inf: all four sent at once
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_embed_mode_sends_each_requests_images_to_the_embeddings_route(url, tmp_path):
    out = tmp_path / "embed.json"
    p = bench("--target", f"ours={url}", "--concurrency", "2", "-n", "6", "--warmup", "1",
              "--mode", "embed", "--images", "repeat", "--images-per-request", "3",
              "--out", str(out), "--plot", str(tmp_path / "e.png"))
    assert p.returncode == 0, p.stderr[-3000:]
    [r] = json.loads(out.read_text())["results"]
    assert set(r) == LEVEL_FIELDS and r["mode"] == "embed" and r["max_tokens"] == 0
    assert (r["requests"], r["completed"], r["failed"], r["errors"]) == (6, 6, 0, [])
    assert r["img_per_s"] == pytest.approx(3 * 6 / r["duration_s"])
    assert r["total_output_tokens"] == 0 and r["short_outputs"] == 0
    check_stats(r["e2e_ms"])
    assert r["ttft_ms"] is None and r["tpot_ms"] is None and r["itl_ms"] is None
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class NotOpenAI(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"no such route")

    def log_message(self, *args):
        pass


@pytest.mark.integration
def test_a_target_that_does_not_answer_v1_models_exits_2_naming_it(tmp_path):
    nothing = f"http://127.0.0.1:{free_port()}"
    p = bench("--target", f"ghost={nothing}", "-n", "1", "--out", str(tmp_path / "x.json"),
              timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "ghost" in p.stderr and nothing in p.stderr and "/v1/models" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "x.json").exists()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = bench("--target", f"web=http://127.0.0.1:{server.server_port}", "-n", "1",
                  timeout=60)
    finally:
        server.shutdown()
    assert p.returncode == 2 and "web" in p.stderr and "answered 404" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.unit
def test_percentiles_itl_and_tpot_on_fixed_numbers():
    values = [0.010, 0.020, 0.030, 0.040, 0.100]
    assert percentile(values, 50) == pytest.approx(0.030)
    assert percentile(values, 90) == pytest.approx(0.076)  # 0.04 + 0.6 * (0.1 - 0.04)
    assert percentile(values, 99) == pytest.approx(0.0976)
    assert percentile([0.5], 99) == 0.5 and percentile([], 50) is None
    assert percentile(list(reversed(values)), 50) == pytest.approx(0.030)  # order-free
    stats = summary_ms(values)
    assert stats == pytest.approx({"mean": 40.0, "p50": 30.0, "p90": 76.0, "p99": 97.6})
    assert summary_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    chunk_times = [0.25, 0.30, 0.32, 0.40]  # first token at 250 ms, then three more
    assert gaps(chunk_times) == pytest.approx([0.05, 0.02, 0.08])
    assert gaps([0.25]) == []
    assert tpot(latency=0.40, ttft=0.25, output_tokens=4) == pytest.approx(0.05)
    assert tpot(latency=0.40, ttft=0.25, output_tokens=1) is None


def decode(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


@pytest.mark.unit
def test_image_sets():
    large = prompts("large", 8)
    images = [decode(p.images[0]) for p in large]
    assert sorted({i.size for i in images}) == sorted(LARGE_SIZES)
    assert {i.format for i in images} == {"PNG", "JPEG"}
    assert max(len(p.images[0]) * 3 // 4 for p in large) < 2_000_000  # configs/test.yaml limit
    assert prompts("large", 9)[8] == large[0]  # cycled

    assert {decode(p.images[0]).size for p in prompts("shapes", 4)} == {(64, 64)}
    single = [p.images[0] for p in prompts("shapes", 4)]
    two = prompts("shapes", 2, per_request=2)
    assert [p.images for p in two] == [tuple(single[:2]), tuple(single[2:])]
    assert len(set(single)) == 4
    for name in ("shapes", "large"):  # each level its own images, the same on every run
        level0, level1 = prompts(name, 8, level=0), prompts(name, 8, level=1)
        assert not {p.images for p in level0} & {p.images for p in level1}
        assert prompts(name, 8, level=1) == level1

    level0, level1 = prompts("repeat", 16, level=0), prompts("repeat", 16, level=1)
    pooled = [p.images[0] for p in level0[::2]]
    alone = [p.images[0] for p in level0[1::2]] + [p.images[0] for p in level1[1::2]]
    assert len(set(pooled)) == 4 and pooled == [p.images[0] for p in level1[::2]]
    assert len(set(alone)) == len(alone) == 16 and not set(alone) & set(pooled)
    assert prompts("repeat", 16, level=0) == level0  # deterministic
