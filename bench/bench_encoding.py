"""Image encoding + connector + projector: time and peak memory of DCI / SCI / STI / "none" vs transformers' Llava.

All models share the same tower weights; ours build and run only the layers up to the deepest hidden state their
connector reads (23 of 24 for CLIP-L with feature layer -2), Llava runs them all. Ratios are against Llava.

    .venv/bin/python bench/bench_encoding.py                 # CLIP-L width, 24 layers, 224 px, batch 1, float32
    .venv/bin/python bench/bench_encoding.py --image-size 336 --batch 4 --dtype bfloat16 --device cuda
"""

import argparse

import torch
from common import (
    add_model_arguments,
    build_dense_connector,
    build_llava,
    describe_machine,
    describe_tower,
    setup,
)

from dense_connector.measurement import clock, interleaved_times, mib, peak_bytes


CONNECTORS = ("dci", "sci", "sti", "none")


def run(args) -> dict[str, tuple[float, int]]:
    # The language model is irrelevant here: one Llama-7B-width layer with a small vocabulary keeps the build cheap.
    args.lm_layers = 1
    llava = build_llava(args, vocab_size=1000)
    models = {connector: build_dense_connector(args, llava, connector) for connector in CONNECTORS}
    size = llava.config.vision_config.image_size
    pixel_values = torch.randn(args.batch, 3, size, size, device=args.device, dtype=getattr(torch, args.dtype))

    encoders = {name: (lambda model=model: model.get_image_features(pixel_values)) for name, model in models.items()}
    encoders["llava"] = lambda: llava.get_image_features(
        pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
    )
    with torch.inference_mode():
        seconds = interleaved_times(encoders, args.reps, clock(args.device, args.threads))
        peaks = {name: peak_bytes(encode, args.device) for name, encode in encoders.items()}

    layers = {name: len(model.model.vision_tower.encoder.layers) for name, model in models.items()}
    layers["llava"] = len(llava.model.vision_tower.encoder.layers)
    print(f"# Encoding {args.batch} image(s), {describe_tower(llava.config.vision_config)}: {describe_machine(args)}")
    print(f"{'model':<8}{'layers':>8}{'time s':>10}{'x llava':>9}{'peak memory':>16}{'x llava':>9}")
    for name in (*CONNECTORS, "llava"):
        print(
            f"{name:<8}{layers[name]:>8}{seconds[name]:>10.3f}{seconds[name] / seconds['llava']:>9.3f}"
            f"{mib(peaks[name]):>16}{peaks[name] / peaks['llava']:>9.3f}"
        )
    return {name: (seconds[name], peaks[name]) for name in seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tower_layers=24, lm_layers=1, image_size=224, reps=5)
    parser.add_argument("--batch", type=int, default=1, help="images encoded at once")
    args = parser.parse_args()
    setup(args)
    run(args)


if __name__ == "__main__":
    main()
