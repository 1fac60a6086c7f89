"""Descriptor extraction rate of one process: images per second of ``extract_descriptors``.

    python benchmarks/extraction_rate.py --arch resnet50 --size 1024 --images 12 [--multiscale]

The images are the synthetic benchmark's (``fastap.datasets.synthetic``, generated once into
``--data-dir``), upscaled to ``--size`` × 3/4·``--size`` (4:3) and saved as JPEG (quality 90), so
that decoding and resizing cost what revisitop1m's 1024-pixel images cost. The net is a
``RetrievalNet`` of ``--arch`` with GeM, with random weights (the rate does not depend on them).
One image warms up, then ``--images`` images are timed end to end (loading, the net at every
scale, pooling, normalisation); the rate and the machine are printed as JSON. docs/distributed.md
projects the time of Revisited Oxford + 1M distractors from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fastap.datasets.revisitop import ImageList
from fastap.datasets.synthetic import generate
from fastap.extraction import MULTISCALE, extract_descriptors
from fastap.models import RetrievalNet


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _large_images(data_dir: Path, size: int, count: int) -> list[Path]:
    info = generate(data_dir, "synth", seed=0, preset="quick")
    out = data_dir / f"large{size}"
    out.mkdir(exist_ok=True)
    paths = []
    for src in sorted(info.image_dir.glob("*.jpg"))[:count]:
        dst = out / src.name
        if not dst.exists():
            with Image.open(src) as im:  # square; stretched to 4:3 like most revisitop photos
                im.convert("RGB").resize((size, round(size * 0.75)),
                                         Image.BILINEAR).save(dst, quality=90)
        paths.append(dst)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=1024, help="longest side of the images")
    p.add_argument("--images", type=int, default=12, help="images timed (after one warm-up)")
    p.add_argument("--multiscale", action="store_true", help="scales 1, 1/sqrt(2), 1/2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "fastap-extraction-rate")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = _large_images(args.data_dir, args.size, args.images + 1)
    if len(paths) < args.images + 1:
        raise SystemExit(f"only {len(paths)} images in the synthetic benchmark")
    torch.manual_seed(0)
    net = RetrievalNet(args.arch).to(args.device)
    scales = MULTISCALE if args.multiscale else (1.0,)
    common = dict(scales=scales, batch_size=args.batch_size, num_workers=args.workers,
                  device=args.device, progress=False, distributed=False)
    extract_descriptors(net, ImageList(paths[:1], max_size=args.size), **common)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = extract_descriptors(net, ImageList(paths[1:], max_size=args.size), **common)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"arch": args.arch, "size": args.size, "scales": list(scales),
              "image_shape": list(Image.open(paths[1]).size), "images": len(paths) - 1,
              "descriptor_dim": int(out.shape[1]), "seconds": seconds,
              "images_per_s": (len(paths) - 1) / seconds, "device": args.device,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "workers": args.workers, "cpu": _cpu_model(), "cpus": os.cpu_count(),
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
