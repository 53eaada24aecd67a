"""The review page end to end: the application on the shared Ray cluster, a real redis-server,
a real encoded clip over HTTP, the PELExplainer scaled up from zero to draw the heatmap, and the
page driven in a real headless Chromium (selenium + chromedriver): it shows the flagged clip's
face and heatmap, a moderator marks the track, and the decision is in Redis.

PEL_REVIEW_SCREENSHOT=docs/img/review-page.png keeps the page's screenshot there."""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from ray import serve

from media import astronaut, make_face_video, serve_directory
from model_utils import SMALL
from workers.app import build_app
from workers.cli import DEFAULT_CONFIG, FINAL_STATES, load_config
from workers.queue import JobQueue
from pel_model.config import AppConfig

pytestmark = pytest.mark.slow
BASE = "http://127.0.0.1:8000/pel"
SECRET, TOKEN = "hunter2pass", "tok-9f8e7d"


def _get(path: str, **headers) -> tuple[int, bytes]:
    req = urllib.request.Request(BASE + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(path: str, body: dict, **headers) -> tuple[int, bytes]:
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def flagged_job(ray_cluster, redis_url, service_checkpoint, tmp_path_factory):
    ckpt, art = service_checkpoint
    root = tmp_path_factory.mktemp("review-media")
    evidence = tmp_path_factory.mktemp("evidence")
    make_face_video(root / "face.mp4", [astronaut()], seconds=4.0)
    args = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    args["redis"].update(url=redis_url, prefix="review")
    args["intake"].update(stream_workers=1, streams_per_worker=1, poll_block_ms=200)
    args["stream"].update(clip_seconds=4.0)
    args["urls"].update(allow_private_addresses=True)
    # threshold 0.01: the network flags every face, so the clip is "fake". The random test
    # network, or the shipped model when a screenshot for the docs is taken.
    if os.environ.get("PEL_REVIEW_SCREENSHOT"):
        args["detector"].update(artifacts_dir=str(tmp_path_factory.mktemp("art")), threshold=0.01)
    else:
        args["detector"].update(checkpoint=str(ckpt), model=SMALL.model_dump(mode="json"),
                                artifacts_dir=str(art), threshold=0.01)
    args["evidence"].update(dir=str(evidence))
    serve.run(build_app(args), name="pel", route_prefix="/pel")
    cfg = AppConfig.model_validate(args)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = JobQueue(client, cfg.redis, cfg.intake, "test")
    with serve_directory(root) as base:
        url = base.replace("http://", f"http://moderator:{SECRET}@") + f"/face.mp4?token={TOKEN}"
        job = queue.push({"id": "review-1", "url": url})
        deadline = time.time() + 300
        while (queue.state(job) or {}).get("state") not in FINAL_STATES:
            assert time.time() < deadline, queue.state(job)
            time.sleep(0.5)
    assert queue.state(job)["state"] == "done", queue.state(job)
    yield {"job": job, "redis": client, "evidence": evidence, "cfg": cfg}
    serve.delete("pel")


def _wait_for_heatmap(timeout_s: float = 240.0) -> dict:
    """The flagged clip, once the explainer (scaled up from zero) has drawn its heatmap."""
    deadline = time.time() + timeout_s
    while True:
        status, body = _get("/api/flagged")
        assert status == 200, body
        clips = json.loads(body)["clips"]
        if clips and clips[0]["tracks"] and clips[0]["tracks"][0]["heatmap"]:
            return clips[0]
        assert time.time() < deadline, clips
        time.sleep(1.0)


def test_review_api_over_http(flagged_job):
    status, body = _get("")
    assert status == 200 and json.loads(body)["model"]  # the status page still answers
    clip = _wait_for_heatmap()
    assert clip["job_id"] == "review-1" and clip["label"] == "fake" and clip["job_state"] == "done"
    assert SECRET not in clip["url"] and TOKEN not in clip["url"]
    track = clip["tracks"][0]
    assert track["label"] == "fake" and track["faces_scored"] >= 3
    for key in ("face", "heatmap"):
        status, png = _get("/" + track[key])
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert _get("/evidence/..%2F..%2Fetc%2Fpasswd")[0] in (400, 404)
    mark = {"job_id": "review-1", "clip_index": clip["clip_index"],
            "track_id": track["track_id"], "decision": "false_positive"}
    assert _post("/api/review", mark)[0] == 403  # no X-PEL-Review header: refused
    assert _post("/api/review", {**mark, "track_id": 99}, **{"X-PEL-Review": "1"})[0] == 404


def test_review_page_in_a_real_browser(flagged_job, tmp_path):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed (make system-deps)")
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    clip = _wait_for_heatmap()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,700"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(BASE + "/review")
        images_loaded = """return [...document.querySelectorAll('section.clip img')]
            .filter(i => i.complete && i.naturalWidth > 100).map(i => i.className)"""
        WebDriverWait(driver, 60).until(
            lambda d: {"face", "heatmap"} <= set(d.execute_script(images_loaded)))
        page = driver.page_source
        assert "review-1" in page and SECRET not in page and TOKEN not in page
        assert driver.find_element(By.ID, "grafana").get_attribute("href").startswith("http")

        def click_confirm(d):
            try:
                d.find_element(By.CSS_SELECTOR, "section.clip .track button.confirm").click()
                return True
            except StaleElementReferenceException:  # the page re-rendered: find it again
                return False

        WebDriverWait(driver, 30).until(click_confirm)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(
            By.CSS_SELECTOR, "section.clip .track .decision").text == "confirmed")
        shot = Path(os.environ.get("PEL_REVIEW_SCREENSHOT") or tmp_path / "review.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
    key = f"review-1:{clip['clip_index']}:{clip['tracks'][0]['track_id']}"
    stored = json.loads(flagged_job["redis"].hget("review:reviews", key))
    assert stored["decision"] == "confirmed" and stored["face"].endswith("/face.png")


def test_a_configured_token_is_required_over_http(flagged_job):
    """The same app redeployed with review.token: every route of the desk wants it, through
    Serve's real proxy (header, query and cookie)."""
    token = "a-review-token-of-some-length"
    args = flagged_job["cfg"].model_dump(mode="json")
    args["review"]["token"] = token
    serve.run(build_app(args), name="pel", route_prefix="/pel")
    assert _get("/api/flagged")[0] == 401
    assert _get("/review")[0] == 401
    assert _get("/api/flagged", Authorization="Bearer wrong-token-wrong-token")[0] == 401
    status, body = _get("/api/flagged", Authorization=f"Bearer {token}")
    assert status == 200 and json.loads(body)["clips"]
    with urllib.request.urlopen(f"{BASE}/review?token={token}", timeout=30) as r:
        cookie = r.headers["Set-Cookie"]
        assert r.status == 200 and "HttpOnly" in cookie and token not in r.read().decode()
    assert _get("/api/flagged", Cookie=cookie.split(";")[0])[0] == 200
    assert _get("")[0] == 200  # the service status stays open (it holds no secret)
