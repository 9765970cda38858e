"""How long each host-side stage of a request holds the GIL: the ceiling on images/s in one process.

More cores do not help work that holds the GIL: it runs one thread at a time, and the inference
thread needs the same lock to launch the model. So one process's host side tops out at
1000 / (GIL-held ms per image). Each stage here is the service's own code on a 640x480 JPEG,
looped alone in a child process for --seconds while py-spy samples it 1000 times a second with
--gil (only samples where the GIL is held count); GIL-held ms per call = samples / rate / calls.
The HTTP row serves the legacy route's shape (a 50 KB POST in, its JSON out) through aiohttp with
a trivial handler to a paced client in another process: aiohttp's own per-request cost.

  .venv/bin/python bench/gil_cost.py [--seconds 4]
  .venv/bin/python bench/gil_cost.py --stages decode --size 4000x3000 --format HEIF   (an iPhone photo)
  .venv/bin/python bench/gil_cost.py --stages decode,resize,thumbnail --icc p3   (tagged Display P3)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from gpu_serve import _jpegs

RATE = 1000  # py-spy samples per second
LIMITS = {"max_file_size": 50 << 20, "max_image_pixels": 100_000_000}
CAPTION = "a man riding a wave on top of a surfboard in the ocean"
STAGES = {
    "decode": "decode + sha256 (decode_image)",
    "resize": "resize to 224 (PixelPrep.prepare)",
    "resize384": "resize to 384 (BLIP large)",
    "thumbnail": "thumbnail (make_thumbnail)",
    "lookup": "look-up (find_caption, SQLite)",
    "emoji": "emoji (mapper.map)",
    "store": "store (save, SQLite)",
    "body": "JSON body (success_body + dumps)",
    "http": "HTTP: aiohttp, 50 KB POST -> JSON",
}


class _Processor:
    """The processor fields PixelPrep mirrors (BLIP-2: 224, BLIP large: 384)."""

    def __init__(self, size: int) -> None:
        self.size = {"height": size, "width": size}
        self.do_resize = self.do_rescale = self.do_normalize = True
        self.do_center_crop = self.do_pad = False
        self.resample = Image.Resampling.BICUBIC
        self.rescale_factor = 1 / 255
        self.image_mean = [0.48145466, 0.4578275, 0.40821073]
        self.image_std = [0.26862954, 0.26130258, 0.27577711]


def _stage_loop(work: Callable[[], object], seconds: float) -> int:
    """The frame py-spy's samples are counted under: only the loop, not the set-up."""
    calls = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        work()
        calls += 1
    return calls


def _encoded(size: tuple[int, int], fmt: str, icc: str = "") -> list[bytes]:
    """The benchmark's photo-like JPEGs, saved again as `fmt` (same pixels, another decoder),
    tagged with a colour profile when `icc` names one (p3: an iPhone's Display P3)."""
    from blip2_service.imaging import heif_support

    images = _jpegs(16 if size == (640, 480) else 2, size)
    if fmt == "JPEG" and not icc:
        return images
    tag: dict[str, object] = {}
    if icc:
        assert icc == "p3", icc
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.icc_profiles import display_p3

        tag = {"icc_profile": display_p3()}
    heif_support()  # registers HEIF with Pillow, for saving too
    out = []
    for data in images:
        buf = io.BytesIO()
        quality = {} if fmt in ("PNG", "BMP") else {"quality": 80}
        Image.open(io.BytesIO(data)).save(buf, format=fmt, **quality, **tag)
        out.append(buf.getvalue())
    return out


def _stage(name: str, size: tuple[int, int], fmt: str = "JPEG", icc: str = "") -> Callable[[], object]:
    import torch

    from blip2_service.captioner.pixels import PixelPrep
    from blip2_service.domain import CaptionResult, EmojiMapping, GenerationSettings, Prediction
    from blip2_service.emoji import EmojiMapper, load_bundled
    from blip2_service.imaging import decode_image, make_thumbnail
    from blip2_service.outcome import success_body
    from blip2_service.store import CaptionRepository, ImageInfo, NewCaption, Sighting, make_engine, upgrade

    torch.set_num_threads(1)
    images = _encoded(size, fmt, icc)
    decoded = decode_image(images[0], **LIMITS)
    table = load_bundled()
    mapper = EmojiMapper(table.table, table.stopwords)
    emojis = tuple(EmojiMapping(m.emoji, m.word) for m in mapper.map(CAPTION))
    settings = GenerationSettings(num_beams=1, max_new_tokens=20, min_new_tokens=20)
    counter = iter(range(1 << 62))
    if name == "decode":
        # A new sha256 each; bytes after a JPEG's end are ignored, not after every format's.
        distinct = [images[i % len(images)] + (b"#%d" % i if fmt == "JPEG" else b"") for i in range(64)]
        return lambda: decode_image(distinct[next(counter) % 64], **LIMITS)
    if name in ("resize", "resize384"):
        prep = PixelPrep(_Processor(224 if name == "resize" else 384), torch.device("cpu"), torch.float32)
        return lambda: prep.prepare(decoded.image)
    if name == "thumbnail":
        return lambda: make_thumbnail(decoded.image)
    if name == "emoji":
        return lambda: mapper.map(CAPTION)
    if name == "body":

        def body() -> object:
            result = CaptionResult("succeeded", "m", [Prediction(CAPTION, emojis)], 0.1, decoded.sha256, record_id=1)
            return json.dumps(success_body(result, "BLIP2"), ensure_ascii=False)

        return body
    engine = make_engine(f"sqlite:///{tempfile.mkdtemp(prefix='gil-cost-')}/gil.db")
    upgrade(engine)
    repo = CaptionRepository(engine)
    if name == "lookup":
        return lambda: repo.find_caption(f"{7:064x}", "m", settings)
    thumb = make_thumbnail(decoded.image)
    rng = random.Random(0)

    def save() -> object:
        return repo.save(
            NewCaption(
                ImageInfo(f"{rng.getrandbits(256):064x}", 50_000, 640, 480, "JPEG", thumb),
                Sighting("http", "upload"),
                "m",
                settings,
                "succeeded",
                [CAPTION],
                [m.as_dict() for m in emojis],
                None,
                0.1,
            )
        )

    assert name == "store", name
    return save


# -- the HTTP row: aiohttp serving the legacy shape to a paced client in another process --------


def _client(port: int, rate: float, seconds: float, body: bytes) -> None:
    import aiohttp

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            end = time.monotonic() + seconds
            tasks = []

            async def one() -> None:
                async with session.post(
                    f"http://127.0.0.1:{port}/v3/analyze", data=body, headers={"Content-Type": "image/jpeg"}
                ) as resp:
                    await resp.read()

            while time.monotonic() < end:
                tasks.append(asyncio.create_task(one()))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)

    asyncio.run(run())


def _serve_http(seconds: float) -> int:
    """Serves until the paced client is done; returns the requests served (the loop is the frame counted)."""
    from aiohttp import web

    from blip2_service.outcome import SERVICE

    answer = json.dumps(
        {"service": SERVICE, "status": "success", "predictions": [{"caption": CAPTION, "emojis": []}], "metadata": {}}
    ).encode()
    served = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal served
        await request.read()
        served += 1
        return web.Response(body=answer, content_type="application/json")

    async def main() -> None:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_post("/v3/analyze", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        client = multiprocessing.get_context("spawn").Process(target=_client, args=(port, 200.0, seconds, _jpegs(1)[0]))
        client.start()
        while client.is_alive():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    asyncio.run(main())
    return served


def child(name: str, seconds: float, size: tuple[int, int], fmt: str, icc: str) -> None:
    if name == "http":
        calls = _serve_http(seconds)
    else:
        work = _stage(name, size, fmt, icc)
        work()
        calls = _stage_loop(work, seconds)
    print(json.dumps({"calls": calls, "seconds": seconds}), flush=True)


def measure(name: str, seconds: float, pyspy: str, size: str, fmt: str = "JPEG", icc: str = "") -> tuple[float, float]:
    """(GIL-held ms per call, wall ms per call), sampled by py-spy in a child process."""
    out = Path(tempfile.mkdtemp(prefix="gil-cost-")) / f"{name}.txt"
    cmd = [pyspy, "record", "--gil", "--nonblocking", "-r", str(RATE), "-f", "raw", "-o", str(out), "--"]
    cmd += [sys.executable, __file__, "--child", name, "--seconds", str(seconds), "--size", size]
    cmd += ["--format", fmt, "--icc", icc]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    report = json.loads(next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("{")))
    marker = "run_forever" if name == "http" else "_stage_loop"
    samples = 0
    record = ""
    for line in out.read_text().splitlines():
        # A frame named by SQL text runs over lines: a record ends at the line that ends in its count.
        record = f"{record}\n{line}" if record else line
        stack, _, count = record.rpartition(" ")
        if not count.isdigit():
            continue
        if marker in stack:
            samples += int(count)
        record = ""
    calls = max(int(report["calls"]), 1)
    return 1000 * samples / RATE / calls, 1000 * seconds / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--stages", default=",".join(STAGES), help="a comma-separated subset of " + ", ".join(STAGES))
    parser.add_argument("--size", default="640x480", help="the JPEG's width x height (a phone photo: 4000x3000)")
    parser.add_argument("--format", default="JPEG", help="the images' format: JPEG, PNG, WEBP, AVIF, HEIF (heif extra)")
    parser.add_argument("--icc", default="", help="tag the images with a colour profile: p3 (an iPhone's Display P3)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        child(args.child, args.seconds, (width, height), args.format.upper(), args.icc)
        return
    pyspy = str(Path(sys.executable).with_name("py-spy"))
    print(f"{args.format.upper()} images, {args.size}" + (f", tagged {args.icc}" if args.icc else ""))
    print(f"{'stage':40} {'GIL ms':>8} {'wall ms':>8}")
    total = 0.0
    for name in args.stages.split(","):
        held, wall = measure(name, args.seconds, pyspy, args.size, args.format.upper(), args.icc)
        if name != "resize384":
            total += held
        print(f"{STAGES[name]:40} {held:8.3f} {wall:8.3f}", flush=True)
    print(f"{'total per BLIP-2 image':40} {total:8.3f}  -> at most {1000 / total:,.0f} images/s in one process")


if __name__ == "__main__":
    main()
