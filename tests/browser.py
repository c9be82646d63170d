"""Draw MNIST digits on the serving page with real input events in headless Chromium.

A digit's strokes are traced from a real MNIST image: its ink is thinned to a one-pixel
skeleton (Zhang-Suen), and the skeleton is walked into pen strokes, each as long as it can
go, a branch starting where it leaves the part already drawn. The page's own pen then
draws them, so what reaches the model is a drawing, not a copy of the image.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright: no browser is downloaded.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCALE = 8  # page pixels per MNIST pixel: a digit of 28x28 becomes 224x224 on the 280x280 pad
# 4-neighbours first, so that a stroke follows the skeleton instead of cutting its corners
NEIGHBOURS = [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)]


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    if not os.access(CHROMIUM, os.X_OK):
        return "chromium is not installed (Debian: apt-get install chromium)"
    return None


def launch(playwright):
    """Headless Chromium from the system, without network side traffic."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: the one-pixel-wide skeleton of a boolean image."""
    img = np.pad(mask.astype(np.uint8), 1)
    h, w = img.shape

    def at(dr: int, dc: int) -> np.ndarray:
        return img[1 + dr : h - 1 + dr, 1 + dc : w - 1 + dc]

    changed = True
    while changed:
        changed = False
        for step in (0, 1):
            p2, p3, p4, p5, p6, p7, p8, p9 = (
                at(*d) for d in [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]
            )
            ring = [p2, p3, p4, p5, p6, p7, p8, p9, p2]
            transitions = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(int) for i in range(8))
            count = p2.astype(int) + p3 + p4 + p5 + p6 + p7 + p8 + p9
            if step == 0:
                side = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                side = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            remove = (at(0, 0) == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if remove.any():
                img[1:-1, 1:-1][remove] = 0
                changed = True
    return img[1:-1, 1:-1].astype(bool)


def trace(skeleton: np.ndarray) -> list[list[tuple[int, int]]]:
    """Walk a skeleton into strokes of (row, col) pixels; each later stroke starts at the drawn part it touches."""
    pixels = set(zip(*map(lambda a: a.tolist(), np.nonzero(skeleton))))
    near = {p: [(p[0] + dr, p[1] + dc) for dr, dc in NEIGHBOURS if (p[0] + dr, p[1] + dc) in pixels] for p in pixels}
    visited: set[tuple[int, int]] = set()
    strokes = []
    while len(visited) < len(pixels):
        todo = sorted(p for p in pixels if p not in visited)
        # Start at an end of a line (fewest undrawn neighbours), not in its middle.
        point = min(todo, key=lambda p: sum(q not in visited for q in near[p]))
        stroke = [q for q in near[point] if q in visited][:1]
        while point is not None:
            visited.add(point)
            stroke.append(point)
            point = next((q for q in near[point] if q not in visited), None)
        # Close a loop (a 0, the top of a 9) when the walk ends beside where it began.
        stroke += [q for q in near[stroke[-1]] if q in visited and q not in stroke[-3:]][:1]
        strokes.append(stroke)
    return strokes


def digit_strokes(image: np.ndarray) -> list[list[tuple[float, float]]]:
    """Pen strokes, in pad pixels, that draw the MNIST digit ``image`` (uint8 28x28) at ``SCALE``."""
    offset = (280 - 28 * SCALE) / 2
    strokes = []
    for stroke in trace(thin(image >= 128)):
        points = stroke[::2] + ([stroke[-1]] if (len(stroke) - 1) % 2 else [])
        strokes.append([(offset + (c + 0.5) * SCALE, offset + (r + 0.5) * SCALE) for r, c in points])
    return strokes


def draw_with_mouse(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw ``strokes`` (pad pixels) on the page's pad: mouse down, moves, mouse up, per stroke."""
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x, box["y"] + y)
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y)
        page.mouse.up()


def draw_with_touch(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw ``strokes`` with a finger: touchStart, touchMove, touchEnd events (Chrome DevTools Protocol)."""
    box = page.locator("#pad").bounding_box()
    cdp = page.context.new_cdp_session(page)
    for stroke in strokes:
        for kind, (x, y) in [("touchStart", stroke[0]), *(("touchMove", p) for p in stroke[1:])]:
            cdp.send(
                "Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": box["x"] + x, "y": box["y"] + y}]}
            )
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def wait_for_answer(page, timeout_ms: float = 20000) -> None:
    """Wait until the page shows the answer to its latest stroke."""
    page.wait_for_function("document.body.dataset.answered === document.body.dataset.strokes", timeout=timeout_ms)


def read_answer(page) -> dict:
    """What the page shows: digit (or None), the ten bar values, the error line, the 28x28 'seen' pixels."""
    return page.evaluate("""() => {
        const text = document.getElementById("digit").textContent;
        const seen = document.getElementById("seen").getContext("2d").getImageData(0, 0, 28, 28).data;
        return {
            digit: /^[0-9]$/.test(text) ? Number(text) : null,
            bars: [...document.querySelectorAll(".fill")].map((e) => Number(e.dataset.probability)),
            status: document.getElementById("status").textContent,
            seen: Array.from({length: 784}, (_, i) => seen[4 * i]),
        };
    }""")


def clear(page) -> None:
    page.click("#clear")
