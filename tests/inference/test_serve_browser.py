"""The serving page in a real headless Chromium: MNIST test digits drawn with real mouse and touch events.

Each digit's strokes are traced from a test image (never trained on) and drawn on the
page's pad (see tests/browser.py); the answer is read from the page as a person sees it.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from mnist_dist.inference.preprocess import preprocess

from browser import (
    clear,
    digit_strokes,
    draw_with_mouse,
    draw_with_touch,
    launch,
    missing_reason,
    read_answer,
    wait_for_answer,
)
from serving import running_server

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

DIGITS = 60  # drawn on the page, from a fixed sample of the test set
MARGIN = 0.10  # the page may score at most this far below the model's test accuracy


@pytest.fixture(scope="module")
def server(trained_run_dir):
    with running_server(trained_run_dir / "model.safetensors") as server:
        yield server


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            context = browser.new_context(viewport={"width": 900, "height": 700}, has_touch=True)
            page = context.new_page()
            page.goto(server.url)
            yield page
        finally:
            browser.close()


def test_digits_drawn_with_the_mouse_are_recognised_about_as_well_as_the_test_set(
    page, mnist_test, trained_run_dir, record_property, capsys
):
    images, labels = mnist_test
    indices = np.random.default_rng(15).choice(len(images), DIGITS, replace=False)
    right = 0
    for i in indices:
        clear(page)
        draw_with_mouse(page, digit_strokes(images[i].numpy()))
        wait_for_answer(page)
        shown = read_answer(page)
        assert shown["status"] == "" and shown["digit"] is not None, shown["status"]
        assert shown["digit"] == int(np.argmax(shown["bars"])) and sum(shown["bars"]) == pytest.approx(1, abs=1e-4)
        right += shown["digit"] == int(labels[i])
    test_accuracy = json.loads((trained_run_dir / "metrics.json").read_text())["test_accuracy"]
    record_property("page_right", f"{right}/{DIGITS}")
    record_property("model_test_accuracy", test_accuracy)
    with capsys.disabled():
        print(
            f"\nserving page: {right}/{DIGITS} drawn digits right ({right / DIGITS:.1%}); "
            f"the model's test accuracy: {test_accuracy:.2%}"
        )
    assert right / DIGITS >= test_accuracy - MARGIN


def test_the_page_shows_what_the_api_answers_and_the_image_the_model_saw(page, server, mnist_test):
    import httpx

    images, labels = mnist_test
    clear(page)
    draw_with_mouse(page, digit_strokes(images[3].numpy()))
    wait_for_answer(page)
    shown = read_answer(page)
    drawing = base64.b64decode(page.evaluate("document.getElementById('pad').toDataURL('image/png')").split(",")[1])
    seen = np.rint(preprocess(drawing).numpy() * 255).reshape(-1)
    assert np.abs(np.array(shown["seen"]) - seen).max() <= 1  # the 28x28 input, as the model saw it
    (answer,) = httpx.post(server.url + "predict", files={"file": ("d.png", drawing)}).json()["results"]
    assert shown["digit"] == answer["digit"] == int(labels[3])
    assert shown["bars"] == pytest.approx(answer["probabilities"], abs=1e-6)
    drawn = page.evaluate(
        "[...document.querySelectorAll('.fill')]"
        ".map((e) => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width)"
    )
    assert drawn == pytest.approx(shown["bars"], abs=0.01)  # each bar as long as its probability


def test_a_finger_draws_like_the_mouse_and_clear_resets_the_page(page, mnist_test):
    strokes = digit_strokes(mnist_test[0][7].numpy())
    clear(page)
    draw_with_mouse(page, strokes)
    wait_for_answer(page)
    with_mouse = read_answer(page)
    clear(page)
    draw_with_touch(page, strokes)
    wait_for_answer(page)
    with_finger = read_answer(page)
    assert with_finger["digit"] == with_mouse["digit"] is not None
    assert np.abs(np.array(with_finger["seen"]) - np.array(with_mouse["seen"])).max() <= 1
    clear(page)
    cleared = read_answer(page)
    assert cleared["digit"] is None and cleared["bars"] == [0] * 10 and max(cleared["seen"]) == 0
    assert page.evaluate(
        "document.getElementById('pad').getContext('2d').getImageData(0, 0, 280, 280).data.every((v) => v === 255)"
    )
