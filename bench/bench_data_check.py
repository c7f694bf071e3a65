"""How fast `dense-connector train` checks its data before the first step, on a synthetic LLaVA-665K-sized mix.

Writes a mix of `--records` records in the LLaVA format (one in five text-only, some multi-turn, as the 665K mix) and
`--images` small PNG and JPEG files they point to, then times `check_records` with the bundled demo checkpoint's
processor with 1 worker and with `--workers` workers, the exact token lengths the length-grouped samplers read
(`DenseConnectorDataCollator.token_lengths`) the same way, and the image part alone with headers only (what the check
reads) against decoding every image (what a check that loads them would cost).

    python bench/bench_data_check.py                       # 665,000 records
    python bench/bench_data_check.py --records 100000 --workers 4
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from PIL import Image
from transformers import AutoProcessor

import dense_connector  # noqa: F401
from dense_connector.training import DenseConnectorDataCollator
from dense_connector.training.checks import RecordChecker, check_records, image_size
from dense_connector.training.sources import Source, load_records


DEMO = Path(dense_connector.__file__).parent / "demo" / "checkpoint"


def write_mix(folder: Path, records: int, images: int) -> Path:
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True)
    for index in range(images):
        size = (rng.randint(200, 640), rng.randint(200, 480))
        suffix = ".jpg" if index % 2 else ".png"
        Image.new("RGB", size, (index % 255, 80, 160)).save(folder / "images" / f"{index}{suffix}")
    with open(folder / "mix.json", "w") as file:
        file.write("[")
        for index in range(records):
            turns = []
            for turn in range(rng.choice((1, 1, 2, 3))):
                question = ("<image>\n" if turn == 0 else "") + "Describe the picture in detail." * rng.randint(1, 3)
                answer = "It shows a shape of some colour. " * rng.randint(1, 6)
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            record = {"id": str(index), "conversations": turns}
            if index % 5:
                image = rng.randrange(images)
                record["image"] = f"images/{image}{'.jpg' if image % 2 else '.png'}"
            else:
                turns[0]["value"] = turns[0]["value"].removeprefix("<image>\n")
            file.write(("," if index else "") + json.dumps(record))
        file.write("]")
    return folder / "mix.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--images", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(DEMO)
    checker = RecordChecker(processor, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = write_mix(Path(tmp), args.records, args.images)
        print(f"wrote {args.records:,} records ({path.stat().st_size / 2**20:,.0f} MiB) and {args.images:,} images "
              f"in {time.perf_counter() - started:.1f} s")  # fmt: skip
        started = time.perf_counter()
        records = load_records(Source(data_path=str(path), image_folder=tmp))
        print(f"loaded in {time.perf_counter() - started:.1f} s")
        timings = {}
        for workers in sorted({1, args.workers}):
            report = check_records(records, checker, "mix.json", workers)
            timings[workers] = report.seconds
            print(f"{workers} worker(s): {report.summary()} -> {report.checked / report.seconds:,.0f} records/s")
        if len(timings) > 1:
            print(f"speed-up with {args.workers} workers: {timings[1] / timings[args.workers]:.2f}x")
        # the exact lengths --group_by_length / --group_by_modality_length read, before the first step
        collator = DenseConnectorDataCollator(processor, image_folder=tmp, max_length=2048)
        timings = {}
        for workers in sorted({1, args.workers}):
            started = time.perf_counter()
            collator.token_lengths(records, workers)
            timings[workers] = time.perf_counter() - started
            print(f"token lengths, {workers} worker(s): {len(records) / timings[workers]:,.0f} records/s")
        if len(timings) > 1:
            print(f"speed-up with {args.workers} workers: {timings[1] / timings[args.workers]:.2f}x")
        paths = [str(path) for path in sorted((Path(tmp) / "images").iterdir())]
        started = time.perf_counter()
        for image in paths:
            image_size(image)
        headers = time.perf_counter() - started
        started = time.perf_counter()
        for image in paths:
            with Image.open(image) as opened:
                opened.convert("RGB")
        decoded = time.perf_counter() - started
        print(f"{len(paths):,} images: headers {headers * 1e6 / len(paths):.0f} us each, decoding "
              f"{decoded * 1e6 / len(paths):.0f} us each ({decoded / headers:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
