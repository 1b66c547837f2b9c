"""Checks that report.html is self-contained and shows its plots.

``offline_problems``: parse the HTML; every <img> must be a data URI decoding to a valid PNG, and
nothing may point at the network (http(s) or protocol-relative URLs in src/href/url()).
``screenshot`` renders the page in headless Chromium with name resolution off (nothing can be
fetched) and ``screenshot_problems`` checks the picture: not blank, with the plots' coloured
pixels present (the tables alone are black and grey).
"""
from __future__ import annotations

import base64
import binascii
import html.parser
import io
import re
import shutil
import subprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""",
                     re.I)


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def offline_problems(text: str, expect_images: int = 1) -> list[str]:
    parser = _Images()
    parser.feed(text)
    problems = [f"network reference: {m.group(0)!r}" for m in NETWORK.finditer(text)]
    if len(parser.sources) < expect_images:
        problems.append(f"{len(parser.sources)} <img> found, expected at least {expect_images}")
    for i, src in enumerate(parser.sources):
        if not src.startswith("data:image/png;base64,"):
            problems.append(f"<img> {i} is not an embedded PNG: {src[:40]!r}")
            continue
        try:
            data = base64.b64decode(src.split(",", 1)[1], validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"<img> {i}: bad base64")
            continue
        problems += [f"<img> {i}: {p}" for p in png_problems(data)]
    return problems


def png_problems(data: bytes) -> list[str]:
    from PIL import Image
    if not data.startswith(PNG_MAGIC):
        return ["not a PNG"]
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:
        return [f"a broken PNG ({e})"]
    return []


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def screenshot(html_path: str, png_path: str, width=1200, height=2600, timeout=120) -> None:
    """Headless Chromium screenshot of ``html_path``, with every host name unresolvable."""
    import os
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--no-first-run",
           f"--window-size={width},{height}", f"--screenshot={png_path}",
           "file://" + os.path.abspath(html_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)


def screenshot_problems(png_path: str, min_coloured=2000) -> list[str]:
    """The screenshot is not blank and shows coloured (plot) pixels."""
    from PIL import Image
    with Image.open(png_path) as im:
        rgb = im.convert("RGB")
        hsv = rgb.convert("HSV")
        pixels = list(rgb.getdata())
        saturation = hsv.getchannel("S").getdata()
    ink = sum(1 for r, g, b in pixels if min(r, g, b) < 200)
    coloured = sum(1 for s in saturation if s > 120)
    problems = []
    if ink < len(pixels) // 1000:
        problems.append(f"the page looks blank ({ink} dark pixels of {len(pixels)})")
    if coloured < min_coloured:
        problems.append(f"no plot shown: {coloured} coloured pixels, expected at least "
                        f"{min_coloured}")
    return problems
