"""Peak activation memory of the DCI feature path, for a batch of images and for a 32-frame video.

Compared with the single-layer path (our "none" connector: the tower up to `F`, the projector) and with a
straightforward DCI that keeps every hidden state (`output_hidden_states=True`, then stack and average per group, as
the original code does). Peaks count only tensors allocated during the call (see
`dense_connector.measurement.peak_bytes`).

Every stored state and every activation of a layer scales with (images x tokens x width), and SDPA never holds the
tokens x tokens attention matrix, so the ratios do not depend on the input size; the CPU default of 112 px (65 tokens
per image) only keeps the run short. The depth matters (a keep-all path holds depth + 1 states): CLIP-L's 24 layers.

    .venv/bin/python bench/bench_feature_memory.py                      # float32, 112 px, 8 images, 32 frames
    .venv/bin/python bench/bench_feature_memory.py --dtype bfloat16
"""

import argparse

import torch
import torch.nn.functional as F
from common import (
    add_model_arguments,
    build_dense_connector,
    build_llava,
    describe_machine,
    describe_tower,
    setup,
)

from dense_connector.measurement import mib, peak_bytes


def keep_all_dci(config, tower, projector, pixel_values: torch.Tensor) -> torch.Tensor:
    """DCI the straightforward way: every hidden state returned, then stacked and averaged per group."""
    states = tower(pixel_values, output_hidden_states=True).hidden_states
    final = states[config.vision_feature_layer][:, 1:]
    means = [
        torch.stack([states[i][:, 1:] for i in group]).sum(0) / len(group) for group in config.dense_connector_groups
    ]
    return projector(torch.cat([final, *means], dim=-1))


def keep_all_video(config, tower, projector, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    features = keep_all_dci(config, tower, projector, pixel_values_videos.flatten(0, 1))
    stride = config.video_pool_stride
    return F.max_pool1d(features.transpose(1, 2), stride, stride).transpose(1, 2).flatten(0, 1)


def report(title: str, peaks: dict[str, int], baseline: str) -> None:
    print(title)
    print(f"{'path':<34}{'peak memory':>16}{'x single layer':>16}")
    for name, value in peaks.items():
        print(f"{name:<34}{mib(value):>16}{value / peaks[baseline]:>16.3f}")


def run(args) -> dict[str, dict[str, int]]:
    args.lm_layers = 1  # the language model does not run here
    llava = build_llava(args, vocab_size=1000)
    dci = build_dense_connector(args, llava, "dci")
    single = build_dense_connector(args, llava, "none")
    config, tower, projector = dci.config, llava.model.vision_tower, dci.model.connector.projector
    size, dtype = config.vision_config.image_size, getattr(torch, args.dtype)
    images = torch.randn(args.batch, 3, size, size, device=args.device, dtype=dtype)
    video = torch.randn(1, args.frames, 3, size, size, device=args.device, dtype=dtype) if args.frames else None

    with torch.inference_mode():
        image_peaks = {
            "single layer (ours, 'none')": peak_bytes(lambda: single.get_image_features(images), args.device),
            "single layer (transformers Llava)": peak_bytes(
                lambda: llava.get_image_features(
                    images, vision_feature_layer=-2, vision_feature_select_strategy="default"
                ),
                args.device,
            ),
            "DCI (ours)": peak_bytes(lambda: dci.get_image_features(images), args.device),
            "DCI keeping every hidden state": peak_bytes(
                lambda: keep_all_dci(config, tower, projector, images), args.device
            ),
        }
        video_peaks = {
            "single layer (ours, 'none')": lambda: single.get_video_features(video),
            "DCI (ours)": lambda: dci.get_video_features(video),
            "DCI keeping every hidden state": lambda: keep_all_video(config, tower, projector, video),
        }
        video_peaks = (
            {name: peak_bytes(encode, args.device) for name, encode in video_peaks.items()} if args.frames else {}
        )
    print(f"# DCI feature-path peak memory, {describe_tower(llava.config.vision_config)}: {describe_machine(args)}")
    report(f"\n{args.batch} images:", image_peaks, "single layer (ours, 'none')")
    if video_peaks:
        report(f"\n1 video of {args.frames} frames:", video_peaks, "single layer (ours, 'none')")
    return {"images": image_peaks, "video": video_peaks}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tower_layers=24, lm_layers=1, image_size=112)
    parser.add_argument("--batch", type=int, default=8, help="images encoded at once")
    parser.add_argument("--frames", type=int, default=32, help="frames of the video (0: no video)")
    args = parser.parse_args()
    setup(args)
    run(args)


if __name__ == "__main__":
    main()
