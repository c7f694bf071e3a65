"""Memory of loading a synthetic 665K-record LLaVA JSON (the shape of `llava_v1_5_mix665k.json`) per process.

Writes the file (image and text-only multi-turn records), then, each in a fresh process, measures the resident memory
added by `dense_connector.training.load_instruction_data` (what every rank does) and by `json.load` (the original's
list of dicts), the peak while loading, and what a forked dataloader worker adds once it has read every record
(reference counts dirty the copy-on-write pages of Python objects). Prints MiB and the ratios of the two.

    python bench/bench_data_memory.py [--records 665000]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


MEASURE = """
import gc, os, sys
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def private():  # pages this process has written: a fork's copies of the parent's pages
    lines = open("/proc/self/smaps_rollup").read().splitlines()
    return sum(int(line.split()[1]) for line in lines if line.startswith("Private_Dirty")) / 2**10
import json, resource
from dense_connector.training import load_instruction_data
before = rss()
records = load_instruction_data(sys.argv[1]) if sys.argv[2] == "package" else json.load(open(sys.argv[1]))
gc.collect()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - before
loaded = rss() - before
read, write = os.pipe()
if os.fork() == 0:
    start = private()
    total = sum(len(r["conversations"]) for r in records)  # what a worker's __getitem__ over the dataset does
    os.write(write, f"{private() - start}".encode())
    os._exit(0)
os.wait()
print(f"{loaded:.0f} {peak:.0f} {float(os.read(read, 64)):.0f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "mix.json")
        turns = [
            {"from": "human", "value": "<image>\nWhat is shown in the picture? Answer briefly."},
            {"from": "gpt", "value": "A red square in the top left corner of a white background."},
        ] * 2
        with open(path, "w") as f:
            json.dump([{"id": str(i), **({"image": f"coco/train2017/{i:012d}.jpg"} if i % 5 else {}),
                        "conversations": turns} for i in range(args.records)], f)  # fmt: skip
        size = os.path.getsize(path) / 2**20
        print(f"{args.records} records, file {size:.0f} MiB")
        measured = {}
        for name in ("package", "json.load"):
            command = [sys.executable, "-c", MEASURE, path, name]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            measured[name] = list(map(float, out.stdout.split()))
    print(f"{'MiB per process':<22}{'loaded':>10}{'peak':>10}{'per worker':>12}")
    for name, values in measured.items():
        print(f"{name:<22}" + "".join(f"{value:>{width}.0f}" for value, width in zip(values, (10, 10, 12))))
    ours, original = measured["package"], measured["json.load"]
    print(f"package / json.load: loaded {ours[0] / original[0]:.2f}x, peak {ours[1] / original[1]:.2f}x")


if __name__ == "__main__":
    main()
